"""The outbox and its relay against the real broker, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from amqpkit import Binding, Broker, BrokerSettings, Delivery, Envelope, Exchange, InvalidMessage, Queue
from amqpkit.outbox import Claim, Outbox, PostgresStore, Relay, StorageError, Store
from amqpkit.outbox import outbox as outbox_module

from ..waiting import until, wait_for
from .conftest import make_store


async def collect(broker: Broker, queue: Queue) -> tuple[list[Delivery[bytes]], Any]:
    """Consume ``queue`` into a list (acking each); returns the list and the consumer."""
    got: list[Delivery[bytes]] = []

    async def on_message(delivery: Delivery[bytes]) -> None:
        got.append(delivery)
        await delivery.ack()

    consumer = await broker.consume(queue, on_message, prefetch=500)
    return got, consumer


@pytest.fixture
async def queue(broker: Broker, name: str) -> AsyncIterator[Queue]:
    q = Queue(f"{name}.events", durable=True)
    await broker.declare_queue(q)
    try:
        yield q
    finally:
        with contextlib.suppress(Exception):
            await broker.delete_queue(q.name)


async def test_committed_rows_are_published_with_their_properties_and_rolled_back_ones_never(
    store: Store, broker: Broker, queue: Queue
) -> None:
    outbox = Outbox(store)
    async with store.transaction() as tx:
        first = await outbox.add(
            tx,
            Envelope(b'{"n": 1}', content_type="application/json", headers={"tenant": "t1", "n": 1}, type="Paid",
                     correlation_id="c-1"),
            routing_key=queue.name,
            ordering_key="order-1",
        )  # fmt: skip
        second = await outbox.add(tx, {"n": 2}, routing_key=queue.name, ordering_key="order-1")

    async def rolled_back() -> None:
        async with store.transaction() as tx:
            await outbox.add(tx, {"n": 3}, routing_key=queue.name, ordering_key="order-1")
            raise RuntimeError("business rule broken: roll back")

    with pytest.raises(RuntimeError, match="business rule"):
        await rolled_back()
    got, consumer = await collect(broker, queue)
    try:
        relay = Relay(store, broker)
        assert await relay.run_once() == 2
        await wait_for(lambda: len(got) >= 2)
        assert [d.message_id for d in got] == [first, second]
        assert json.loads(got[0].body) == {"n": 1}
        assert got[0].content_type == "application/json"
        assert dict(got[0].headers) == {"tenant": "t1", "n": 1}
        assert got[0].type == "Paid" and got[0].correlation_id == "c-1"
        assert json.loads(got[1].body) == {"n": 2}
        assert await store.counts() == {"pending": 0, "sent": 2, "failed": 0}
        assert await relay.run_once() == 0
    finally:
        await consumer.cancel()


async def test_add_outside_a_transaction_is_refused(store: Store, tmp_path: Path) -> None:
    outbox = Outbox(store)
    with pytest.raises(StorageError, match="open transaction"):
        await outbox.add(object(), b"x", routing_key="q")
    if isinstance(store, PostgresStore):
        async with store.pool.acquire() as conn:  # a connection, but no transaction open
            with pytest.raises(StorageError, match="open transaction"):
                await outbox.add(conn, b"x", routing_key="q")


async def test_headers_that_json_cannot_hold_are_refused_when_added(store: Store) -> None:
    outbox = Outbox(store)
    async with store.transaction() as tx:
        with pytest.raises(TypeError, match="JSON"):
            await outbox.add(tx, Envelope(b"x", headers={"raw": b"\x00"}), routing_key="q")
    assert await store.counts() == {"pending": 0, "sent": 0, "failed": 0}


@pytest.mark.parametrize(
    "envelope",
    [Envelope(b"x", priority=300), Envelope(b"x", message_id="m" * 256), Envelope(b"x", headers={"k" * 129: 1})],
    ids=["priority 300", "message id 256 bytes", "header name 129 bytes"],
)
async def test_a_message_amqp_cannot_carry_is_refused_when_added(store: Store, envelope: Envelope) -> None:
    outbox = Outbox(store)
    async with store.transaction() as tx:
        with pytest.raises(InvalidMessage):
            await outbox.add(tx, envelope, routing_key="q")
        with pytest.raises(InvalidMessage, match="128"):  # the add's own headers too
            await outbox.add(tx, b"x", routing_key="q", headers={"n" * 129: 1})
    assert await store.counts() == {"pending": 0, "sent": 0, "failed": 0}


async def test_a_stored_row_amqp_cannot_carry_is_kept_aside_and_its_key_goes_on(
    store: Store, broker: Broker, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row stored without the add's check (by an older release, or written by hand): the encoder's refusal is
    for good, so the row is kept aside as failed and the next row of its key goes out."""
    outbox = Outbox(store)
    monkeypatch.setattr(outbox_module, "check_sendable", lambda properties: None)
    async with store.transaction() as tx:
        await outbox.add(tx, Envelope(b"bad", priority=300), routing_key=queue.name, ordering_key="k")
        await outbox.add(tx, b"next", routing_key=queue.name, ordering_key="k")
    got, consumer = await collect(broker, queue)
    try:
        relay = Relay(store, broker)
        await relay.run_once()
        await wait_for(lambda: len(got) >= 1)
        assert [d.body for d in got] == [b"next"]
        assert relay.failed == 1
        [failed] = await store.failed_rows()
        assert "priority" in failed.reason and "InvalidMessage" in failed.reason
    finally:
        await consumer.cancel()


@pytest.mark.parametrize("column", ["body", "attempts"])
async def test_a_sqlite_row_written_by_hand_with_a_wrong_type_is_kept_aside_and_the_others_go(
    tmp_path: Path, pg_url: str, broker: Broker, queue: Queue, column: str
) -> None:
    """SQLite keeps whatever another tool writes (a text body, ``attempts='n/a'``); such a row failed the whole
    batch as it was read, every round: nothing was published, not even the good rows before it (the hunt: pending
    3, sent 0, for ever). It is kept aside as failed, saying which column, and the others go out."""
    store = make_store("sqlite", tmp_path, pg_url, "")
    await store.open()
    try:
        await store.create_tables()
        outbox = Outbox(store)
        async with store.transaction() as tx:
            await outbox.add(tx, b"good-1", routing_key=queue.name)
        body, attempts = ("hello", 0) if column == "body" else (b"\x00", "n/a")
        with sqlite3.connect(tmp_path / "outbox.db") as db:
            db.execute(
                "INSERT INTO amqpkit_outbox (message_id, exchange, routing_key, body, created_at, attempts)"
                " VALUES ('by-hand', '', ?, ?, 0, ?)",
                (queue.name, body, attempts),
            )
        async with store.transaction() as tx:
            await outbox.add(tx, b"good-2", routing_key=queue.name)
        got, consumer = await collect(broker, queue)
        try:
            relay = Relay(store, broker)
            await relay.run_once()
            await wait_for(lambda: len(got) >= 2)
            assert sorted(d.body for d in got) == [b"good-1", b"good-2"]
            assert relay.failed == 1
            [failed] = await store.failed_rows()
            assert failed.message_id == "by-hand" and column in failed.reason, failed
        finally:
            await consumer.cancel()
    finally:
        await store.close()


async def test_a_sqlite_file_removed_or_replaced_under_the_relay_is_said_and_opened_again(
    tmp_path: Path, pg_url: str, broker: Broker, queue: Queue
) -> None:
    """The database file removed under a running relay (or replaced: restored from a backup): the relay kept its
    connection to the unlinked file, and a row a writer committed to the new file stayed pending for ever, with
    nothing said (the hunt: pending 1, relay errors 0). Removed: each round fails, saying so; a new file there:
    opened again, and its rows go out."""
    path = tmp_path / "outbox.db"
    store = make_store("sqlite", tmp_path, pg_url, "")
    await store.open()
    got, consumer = await collect(broker, queue)
    try:
        await store.create_tables()
        async with Relay(store, broker, poll_interval=0.1) as relay:
            await asyncio.sleep(0.3)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            await wait_for(lambda: relay.errors >= 1, timeout=10)
            writer = make_store("sqlite", tmp_path, pg_url, "")
            await writer.open()
            try:
                await writer.create_tables()
                async with writer.transaction() as tx:
                    await Outbox(writer).add(tx, b"after", routing_key=queue.name)
                await wait_for(lambda: len(got) >= 1, timeout=15)
            finally:
                await writer.close()
        assert [d.body for d in got] == [b"after"]
    finally:
        await consumer.cancel()
        await store.close()


async def test_same_ordering_key_goes_out_in_commit_order(store: Store, broker: Broker, queue: Queue) -> None:
    """T1 adds first but commits late; T2 adds the same key meanwhile and commits as soon as it can.

    The events must leave in the order the transactions committed, whatever order their rows were drawn in.
    """
    outbox = Outbox(store)
    committed: list[str] = []
    t1_added = asyncio.Event()
    t2_started = asyncio.Event()

    @contextlib.asynccontextmanager
    async def transaction(label: str) -> AsyncIterator[Any]:
        """A transaction whose commit is noted as soon as it returns (before the connection goes back to
        the pool, which is another round trip in which the other transaction could overtake the note)."""
        if isinstance(store, PostgresStore):
            async with store.pool.acquire() as conn:
                async with conn.transaction():
                    yield conn
                committed.append(label)
        else:
            async with store.transaction() as tx:
                yield tx
            committed.append(label)

    async def t1() -> None:
        async with transaction("t1") as tx:
            await outbox.add(tx, b"t1", routing_key=queue.name, ordering_key="acct-7")
            t1_added.set()
            await t2_started.wait()
            if isinstance(store, PostgresStore):
                # T2 is waiting for the key (its add cannot finish while T1 holds it).
                async def t2_waits() -> bool:
                    async with store.pool.acquire() as conn:
                        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                        return bool(await conn.fetchval(waiting))

                await until(t2_waits)
            for _ in range(20):
                await asyncio.sleep(0)  # T2 gets every chance to overtake

    async def t2() -> None:
        await t1_added.wait()
        t2_started.set()
        async with transaction("t2") as tx:
            await outbox.add(tx, b"t2", routing_key=queue.name, ordering_key="acct-7")

    await asyncio.gather(t1(), t2())
    got, consumer = await collect(broker, queue)
    try:
        await Relay(store, broker).run_once()
        await wait_for(lambda: len(got) >= 2)
        assert [d.body.decode() for d in got] == committed
    finally:
        await consumer.cancel()


async def test_many_keys_each_in_order(store: Store, broker: Broker, queue: Queue) -> None:
    outbox = Outbox(store)
    for i in range(60):
        async with store.transaction() as tx:
            await outbox.add(tx, {"key": f"k{i % 5}", "seq": i}, routing_key=queue.name, ordering_key=f"k{i % 5}")
            if i % 7 == 0:
                await outbox.add(tx, {"key": None, "seq": i}, routing_key=queue.name)
    got, consumer = await collect(broker, queue)
    try:
        relay = Relay(store, broker, batch_size=16)
        while await relay.run_once():
            pass
        await wait_for(lambda: len(got) >= 69)
        values = [json.loads(d.body) for d in got]
        for k in range(5):
            seqs = [v["seq"] for v in values if v["key"] == f"k{k}"]
            assert seqs == sorted(seqs) and len(seqs) == 12
        assert relay.sent == 69
    finally:
        await consumer.cancel()


async def test_unpublished_row_is_retried_with_backoff_and_holds_back_its_key_only(
    store: Store, broker: Broker, queue: Queue, name: str
) -> None:
    """A row whose exchange is missing is retried later; the next row of its key waits; other keys go on."""
    outbox = Outbox(store)
    late = Exchange(f"{name}.late", durable=False, auto_delete=False)
    async with store.transaction() as tx:
        await outbox.add(tx, b"a1", exchange=late, routing_key=queue.name, ordering_key="a")
        await outbox.add(tx, b"a2", routing_key=queue.name, ordering_key="a")
        await outbox.add(tx, b"b1", routing_key=queue.name, ordering_key="b")
    got, consumer = await collect(broker, queue)
    try:
        relay = Relay(store, broker, retry_initial=0.3, retry_jitter=0)
        await relay.run_once()
        await wait_for(lambda: len(got) >= 1)
        assert relay.retried == 1 and relay.sent == 1
        assert [d.body for d in got] == [b"b1"]
        await relay.run_once()  # a2 still waits behind a1
        assert [d.body for d in got] == [b"b1"]
        assert (await store.counts())["pending"] == 2
        await broker.bind(Binding(late, queue, routing_key=queue.name))

        async def drained() -> bool:
            await relay.run_once()
            return (await store.counts())["pending"] == 0

        await until(drained, timeout=20)
        await wait_for(lambda: len(got) >= 3)
        assert [d.body for d in got] == [b"b1", b"a1", b"a2"]
    finally:
        await consumer.cancel()
        with contextlib.suppress(Exception):
            await broker.delete_exchange(late.name)


async def test_a_key_waiting_for_a_retry_holds_back_no_other_rows_however_many_it_has(
    store: Store, broker: Broker, queue: Queue, name: str
) -> None:
    """More rows of a waiting key than a batch holds, ahead of the others: the others still go out.

    The claim took the first batch_size pending rows and then dropped the waiting key's: with a batch's
    worth of them at the head, every round came back empty and no other row ever left."""
    outbox = Outbox(store)
    missing = Exchange(f"{name}.missing", durable=False)
    async with store.transaction() as tx:
        await outbox.add(tx, b"head", exchange=missing, routing_key=queue.name, ordering_key="stuck")
        for i in range(12):
            await outbox.add(tx, f"stuck {i}".encode(), routing_key=queue.name, ordering_key="stuck")
        for i in range(3):
            await outbox.add(tx, f"free {i}".encode(), routing_key=queue.name)
            await outbox.add(tx, f"other {i}".encode(), routing_key=queue.name, ordering_key="other")
    got, consumer = await collect(broker, queue)
    try:
        relay = Relay(store, broker, batch_size=5, retry_initial=60, retry_jitter=0)
        assert await relay.run_once() == 5  # the head and four of its key: the head is not routed, they wait
        assert relay.retried == 1 and relay.sent == 0
        assert await relay.run_once() == 5  # the six rows of the other keys: five of them, then the last
        assert await relay.run_once() == 1
        await wait_for(lambda: len(got) >= 6)
        assert sorted(d.body for d in got) == sorted(
            [b"free 0", b"free 1", b"free 2", b"other 0", b"other 1", b"other 2"]
        )
        assert [d.body for d in got if d.body.startswith(b"other")] == [b"other 0", b"other 1", b"other 2"]
        assert await relay.run_once() == 0  # the stuck key waits for its head's retry
        assert await store.counts() == {"pending": 13, "sent": 6, "failed": 0}
    finally:
        await consumer.cancel()


async def test_unroutable_row_is_not_marked_sent(store: Store, broker: Broker, name: str) -> None:
    outbox = Outbox(store)
    async with store.transaction() as tx:
        await outbox.add(tx, b"nobody", routing_key=f"{name}.nobody-listens")
    relay = Relay(store, broker, retry_initial=60)
    await relay.run_once()
    assert relay.sent == 0 and relay.retried == 1
    assert (await store.counts())["pending"] == 1


async def test_too_large_row_is_kept_aside_as_failed_and_the_relay_goes_on(
    store: Store, settings: BrokerSettings, queue: Queue
) -> None:
    outbox = Outbox(store)
    async with store.transaction() as tx:
        big = await outbox.add(tx, b"x" * 5000, routing_key=queue.name, ordering_key="k")
        await outbox.add(tx, b"small", routing_key=queue.name, ordering_key="k")
    async with Broker(settings.model_copy(update={"max_message_size": 1000})) as small_broker:
        got, consumer = await collect(small_broker, queue)
        try:
            relay = Relay(store, small_broker)
            await relay.run_once()
            await wait_for(lambda: len(got) >= 1)
            assert [d.body for d in got] == [b"small"]
            assert relay.failed == 1
            failed = await store.failed_rows()
            assert [(f.message_id, f.size) for f in failed] == [(big, 5000)]
            assert "5000 bytes" in failed[0].reason and "MessageTooLarge" in failed[0].reason
            assert await store.counts() == {"pending": 0, "sent": 1, "failed": 1}
            assert await relay.run_once() == 0  # kept aside, not tried again by itself
            assert await store.retry_failed() == 1
            assert (await store.counts())["pending"] == 1
        finally:
            await consumer.cancel()


class _CrashBeforeMark:
    """A store whose relay dies after the broker confirmed and before the rows are marked sent."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.crashes = 1

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[Claim]:
        async with self.inner.claim(limit) as claim:
            yield claim
            if self.crashes:
                self.crashes -= 1
                raise ConnectionResetError("simulated crash between the confirm and the mark")


async def test_crash_between_confirm_and_mark_resends_with_the_same_message_ids(
    store: Store, broker: Broker, queue: Queue
) -> None:
    outbox = Outbox(store)
    ids = []
    async with store.transaction() as tx:
        for i in range(5):
            ids.append(await outbox.add(tx, str(i).encode(), routing_key=queue.name, ordering_key="k"))
    got, consumer = await collect(broker, queue)
    try:
        relay = Relay(_CrashBeforeMark(store), broker)
        with pytest.raises(ConnectionResetError):
            await relay.run_once()
        await wait_for(lambda: len(got) >= 5)
        assert (await store.counts())["pending"] == 5  # confirmed, but not marked
        assert relay.sent == 0  # nor counted
        await relay.run_once()
        await wait_for(lambda: len(got) >= 10)
        assert [d.message_id for d in got] == ids + ids  # sent again, same ids, same order
        assert await store.counts() == {"pending": 0, "sent": 5, "failed": 0}
    finally:
        await consumer.cancel()


class _SlowBroker:
    """A broker whose publishes each take ``delay`` seconds more (a loaded broker, a far one)."""

    def __init__(self, inner: Broker, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(self.delay)
        await self.inner.publish(*args, **kwargs)


async def test_an_idle_in_transaction_timeout_does_not_end_the_claim_while_it_publishes(
    pg_url: str, pg_schema: str, broker: Broker, queue: Queue
) -> None:
    """An operator's idle_in_transaction_session_timeout (here 200 ms) is shorter than a batch takes to publish
    (one key, five rows, 100 ms each): the server ended the claim's transaction before the mark, so every round
    sent the batch again and marked nothing, while relay.sent counted them all."""
    separator = "&" if "?" in pg_url else "?"
    store = PostgresStore(f"{pg_url}{separator}idle_in_transaction_session_timeout=200", schema=pg_schema)
    await store.open()
    try:
        await store.create_tables()
        outbox = Outbox(store)
        async with store.transaction() as tx:
            for i in range(5):
                await outbox.add(tx, str(i).encode(), routing_key=queue.name, ordering_key="k")
        got, consumer = await collect(broker, queue)
        try:
            relay = Relay(store, _SlowBroker(broker, 0.1))  # type: ignore[arg-type]
            assert await relay.run_once() == 5
            assert await store.counts() == {"pending": 0, "sent": 5, "failed": 0}
            assert relay.sent == 5
            await wait_for(lambda: len(got) >= 5)
        finally:
            await consumer.cancel()
    finally:
        await store.close()


async def test_a_claim_ended_by_the_server_is_named_and_counts_nothing(
    store: Store, pg_url: str, pg_schema: str, broker: Broker, queue: Queue
) -> None:
    """The claim's connection ended by the server mid-batch (pg_terminate_backend here): the round fails with a
    StorageError that says so, not asyncpg's 'cannot call Transaction.__aexit__()', and nothing is counted sent."""
    if not isinstance(store, PostgresStore):
        pytest.skip("PostgreSQL: the server ends a session")
    outbox = Outbox(store)
    async with store.transaction() as tx:
        for i in range(3):
            await outbox.add(tx, str(i).encode(), routing_key=queue.name, ordering_key="k")

    class Terminating(_SlowBroker):
        async def publish(self, *args: Any, **kwargs: Any) -> None:
            killer = await asyncpg.connect(pg_url)
            try:
                await killer.fetchval(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE state = 'idle in transaction' AND query LIKE $1",
                    f'%"{pg_schema}".amqpkit_outbox%',
                )
            finally:
                await killer.close()
            await super().publish(*args, **kwargs)

    relay = Relay(store, Terminating(broker, 0))  # type: ignore[arg-type]
    with pytest.raises(StorageError, match="the database ended the relay's transaction"):
        await relay.run_once()
    assert relay.sent == 0
    assert (await store.counts())["pending"] == 3


async def test_several_relays_never_send_the_same_row(
    backend: str, tmp_path: Path, pg_url: str, pg_schema: str, settings: BrokerSettings, queue: Queue
) -> None:
    """Three relays, each with its own store connection and broker connection, over 1500 rows in 30 keys:
    every row is sent exactly once (no crash here, so no resend), and each key stays in order."""
    async with contextlib.AsyncExitStack() as outer:
        writer = make_store(backend, tmp_path, pg_url, pg_schema)
        await writer.open()
        outer.push_async_callback(writer.close)
        await writer.create_tables()
        await _several_relays(backend, tmp_path, pg_url, pg_schema, settings, queue, writer)


async def _several_relays(
    backend: str, tmp_path: Path, pg_url: str, pg_schema: str, settings: BrokerSettings, queue: Queue, writer: Store
) -> None:
    outbox = Outbox(writer)
    for start in range(0, 1500, 100):
        async with writer.transaction() as tx:
            for i in range(start, start + 100):
                await outbox.add(tx, {"seq": i, "key": i % 30}, routing_key=queue.name, ordering_key=f"k{i % 30}")
    stores = [make_store(backend, tmp_path, pg_url, pg_schema) for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        for s in stores:
            await s.open()
            stack.push_async_callback(s.close)
        brokers = [await stack.enter_async_context(Broker(settings)) for _ in stores]
        got, consumer = await collect(brokers[0], queue)
        stack.push_async_callback(consumer.cancel)
        relays = [Relay(s, b, batch_size=40, poll_interval=0.05) for s, b in zip(stores, brokers, strict=True)]
        for r in relays:
            await stack.enter_async_context(r)
        await wait_for(lambda: len(got) >= 1500, timeout=60)
        ids = [d.message_id for d in got]
        assert len(ids) == len(set(ids)) == 1500
        values = [json.loads(d.body) for d in got]
        for k in range(30):
            seqs = [v["seq"] for v in values if v["key"] == k]
            assert seqs == sorted(seqs)

        async def all_marked() -> bool:
            # A delivery can reach the consumer before its confirm reaches the relay: wait for the marks.
            return (await writer.counts())["sent"] >= 1500

        await until(all_marked, timeout=30)
    assert await writer.counts() == {"pending": 0, "sent": 1500, "failed": 0}
    assert [r.errors for r in relays] == [0, 0, 0]
    if backend == "sqlite":
        assert sum(1 for r in relays if r.sent) == 1  # one writer; the others stood by
    assert sum(r.sent for r in relays) == 1500


async def test_sent_rows_are_deleted_after_the_retention(store: Store, broker: Broker, queue: Queue) -> None:
    outbox = Outbox(store)
    async with store.transaction() as tx:
        for i in range(3):
            await outbox.add(tx, str(i).encode(), routing_key=queue.name)
    relay = Relay(store, broker, retention=3600)
    await relay.run_once()
    async with store.transaction() as tx:
        await outbox.add(tx, b"pending", routing_key=f"{queue.name}.nobody")
    assert await store.purge_sent(3600) == 0  # sent just now: kept
    assert await store.purge_sent(0) == 3
    assert await store.counts() == {"pending": 1, "sent": 0, "failed": 0}


class _StuckPurge:
    """A store whose cleanup of sent rows never finishes (waits on a lock nobody releases)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.purging = asyncio.Event()

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    async def purge_sent(self, older_than: float) -> int:
        self.purging.set()
        await asyncio.Event().wait()
        return 0


async def test_a_cleanup_that_does_not_finish_holds_up_no_publishing(
    store: Store, broker: Broker, queue: Queue
) -> None:
    """The relay awaited its cleanup in the publishing loop: while it waited, nothing was published."""
    outbox = Outbox(store)
    stuck = _StuckPurge(store)
    got, consumer = await collect(broker, queue)
    try:
        relay = Relay(stuck, broker, poll_interval=0.05)
        async with relay:
            await asyncio.wait_for(stuck.purging.wait(), 10)
            async with store.transaction() as tx:
                for i in range(3):
                    await outbox.add(tx, str(i).encode(), routing_key=queue.name)
            await wait_for(lambda: len(got) >= 3, timeout=10)
        assert relay.sent == 3
    finally:
        await consumer.cancel()


async def test_purging_sent_rows_skips_rows_another_transaction_holds(
    store: Store, pg_url: str, broker: Broker, queue: Queue
) -> None:
    """An old sent row locked by someone else's open transaction (an archiving job): the DELETE waited on it
    with no end; now it leaves that row for a later cleanup and deletes the others."""
    if not isinstance(store, PostgresStore):
        pytest.skip("PostgreSQL row locks")
    outbox = Outbox(store)
    async with store.transaction() as tx:
        for i in range(3):
            await outbox.add(tx, str(i).encode(), routing_key=queue.name)
    await Relay(store, broker).run_once()
    other = await asyncpg.connect(pg_url)
    try:
        table = store.outbox_table  # the test's own schema
        await other.execute(f"UPDATE {table} SET sent_at = now() - interval '2 days'")  # noqa: S608
        locked = other.transaction()
        await locked.start()
        first = f"(SELECT min(id) FROM {table})"  # noqa: S608
        await other.execute(f"UPDATE {table} SET last_error = 'archived' WHERE id = {first}")  # noqa: S608
        assert await asyncio.wait_for(store.purge_sent(3600), 5) == 2
        await locked.rollback()
    finally:
        await other.close()
    assert await store.purge_sent(3600) == 1


async def test_a_commit_wakes_an_idle_relay(store: Store, broker: Broker, queue: Queue) -> None:
    """With a poll interval of a minute, a new row still goes out at once: NOTIFY on PostgreSQL, the
    store's own commit on SQLite."""
    outbox = Outbox(store)
    got, consumer = await collect(broker, queue)
    try:
        async with Relay(store, broker, poll_interval=60, cleanup_interval=3600):
            for i in range(3):
                async with store.transaction() as tx:
                    await outbox.add(tx, str(i).encode(), routing_key=queue.name)
                await wait_for(lambda i=i: len(got) > i, timeout=10)  # type: ignore[misc]
    finally:
        await consumer.cancel()
