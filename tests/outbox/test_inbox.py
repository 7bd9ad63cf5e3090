"""The inbox with the existing patterns (Worker, Subscriber, RpcServer), on SQLite and PostgreSQL."""

# Table names in these SQL strings are the store's own (checked identifiers).
# ruff: noqa: S608

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from amqpkit import (
    Broker,
    Delivery,
    Envelope,
    Exchange,
    ExchangeType,
    RemoteError,
    RetryPolicy,
    RpcClient,
    RpcServer,
    Subscriber,
    Worker,
    WorkQueue,
)
from amqpkit.outbox import IDEMPOTENCY_KEY_HEADER, Inbox, PostgresStore, SqliteStore, Store

from ..waiting import until, wait_for


class Deposit(BaseModel):
    account: str
    amount: int


class Receipt(BaseModel):
    account: str
    balance: int


def accounts_table(store: Store) -> str:
    """The test's accounts table, in the test's own PostgreSQL schema (unqualified it would land in
    ``public``, shared by every test run on the server at once)."""
    if isinstance(store, PostgresStore) and store.schema:
        return f'"{store.schema}".accounts_t'
    return "accounts_t"


async def make_accounts(store: Store) -> None:
    table = accounts_table(store)
    async with store.transaction() as tx:
        await tx.execute(f"CREATE TABLE IF NOT EXISTS {table} (account TEXT PRIMARY KEY, balance INTEGER NOT NULL)")
        await tx.execute(f"INSERT INTO {table} VALUES ('a', 0)")


async def deposit_into(store: Store, tx: Any, deposit: Deposit) -> int:
    """Apply a deposit in ``tx``; returns the new balance."""
    if isinstance(store, PostgresStore):
        return int(
            await tx.fetchval(
                f"UPDATE {accounts_table(store)} SET balance = balance + $1 WHERE account = $2 RETURNING balance",
                deposit.amount,
                deposit.account,
            )
        )
    await tx.execute("UPDATE accounts_t SET balance = balance + ? WHERE account = ?", (deposit.amount, deposit.account))
    cursor = await tx.execute("SELECT balance FROM accounts_t WHERE account = ?", (deposit.account,))
    row = await cursor.fetchone()
    return int(row[0])


async def balance(store: Store) -> int:
    async with store.transaction() as tx:
        if isinstance(store, PostgresStore):
            return int(await tx.fetchval(f"SELECT balance FROM {accounts_table(store)} WHERE account = 'a'"))
        cursor = await tx.execute("SELECT balance FROM accounts_t WHERE account = 'a'")
        row = await cursor.fetchone()
        return int(row[0])


@pytest.fixture
async def accounts(store: Store) -> AsyncIterator[Store]:
    await make_accounts(store)
    try:
        yield store
    finally:
        async with store.transaction() as tx:
            await tx.execute(f"DROP TABLE IF EXISTS {accounts_table(store)}")


def deposit(amount: int, message_id: str) -> Envelope:
    return Envelope(Deposit(account="a", amount=amount).model_dump_json().encode(), content_type="application/json",
                    message_id=message_id)  # fmt: skip


async def test_worker_runs_a_redelivered_task_once(accounts: Store, broker: Broker, name: str) -> None:
    store = accounts
    inbox = Inbox(store, consumer="bank")
    calls: list[int] = []

    async def apply(d: Deposit, tx: Any) -> None:
        calls.append(d.amount)
        await deposit_into(store, tx, d)

    queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.deposits")
    handler = inbox.handler(apply)
    try:
        async with Worker(queue, handler, concurrency=4) as worker:
            await queue.declare()
            for amount, mid in [(5, "m1"), (7, "m2"), (5, "m1"), (5, "m1")]:
                await broker.publish(deposit(amount, mid), routing_key=queue.name)
            await wait_for(lambda: worker.completed >= 4)
        assert sorted(calls) == [5, 7]
        assert await balance(store) == 12
        assert inbox.processed == 2 and inbox.duplicates == 2
        assert await broker.queue_counts(queue.name) == (0, 0)
    finally:
        await broker.delete_queue(queue.name)
        await broker.delete_queue(queue.dlq_name)


async def test_failed_handler_rolls_back_its_effects_and_its_record(accounts: Store, broker: Broker, name: str) -> None:
    """The first attempt fails after writing: nothing of it stays, and the retry is processed (not skipped)."""
    store = accounts
    inbox = Inbox(store, consumer="bank")
    attempts: list[int] = []

    async def apply(d: Delivery[Deposit], tx: Any) -> None:
        attempts.append(int(d.headers.get("x-attempt", 1)))
        await deposit_into(store, tx, d.value)
        if len(attempts) == 1:
            raise RuntimeError("failed after the write")

    queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.deposits", retry=RetryPolicy(initial_delay=0.1, jitter=0))
    try:
        async with Worker(queue, inbox.handler(apply)) as worker:
            await queue.declare()
            await broker.publish(deposit(10, "m1"), routing_key=queue.name)
            await wait_for(lambda: worker.completed >= 1, timeout=30)
        assert attempts == [1, 2]
        assert await balance(store) == 10
        assert inbox.processed == 1 and inbox.duplicates == 0
    finally:
        for q in (queue.name, queue.dlq_name, f"{queue.name}.retry.100"):
            with contextlib.suppress(Exception):
                await broker.delete_queue(q)


async def test_subscriber_applies_each_message_once(accounts: Store, broker: Broker, name: str) -> None:
    store = accounts
    inbox = Inbox(store, consumer="ledger")
    exchange = Exchange(f"{name}.money", type=ExchangeType.FANOUT, durable=False, auto_delete=True)

    async def apply(d: Deposit, tx: Any) -> None:
        await deposit_into(store, tx, d)

    async with Subscriber(broker, exchange, inbox.handler(apply)) as sub:
        for amount, mid in [(1, "x"), (2, "y"), (1, "x"), (3, "z"), (2, "y")]:
            await broker.publish(deposit(amount, mid), exchange=exchange)
        await wait_for(lambda: sub.handled >= 5)
    assert await balance(store) == 6
    assert (inbox.processed, inbox.duplicates) == (3, 2)


async def test_two_consumers_each_process_the_same_message(accounts: Store) -> None:
    store = accounts
    seen: list[str] = []

    async def note(d: Delivery[bytes], tx: Any) -> None:
        seen.append(d.message_id or "")

    envelope = Envelope(b"x", message_id="same")
    for consumer in ("one", "two", "one"):
        d: Delivery[bytes] = Delivery(b"x", b"x", envelope.properties())
        await Inbox(store, consumer=consumer).handler(note)(d)
    assert seen == ["same", "same"]


async def test_rpc_repeated_idempotency_key_gets_the_stored_reply(accounts: Store, broker: Broker, name: str) -> None:
    store = accounts
    inbox = Inbox(store, consumer="bank-rpc")
    calls: list[int] = []

    async def apply(d: Deposit, tx: Any) -> Receipt:
        calls.append(d.amount)
        return Receipt(account=d.account, balance=await deposit_into(store, tx, d))

    server = RpcServer(broker, f"{name}.rpc")
    server.add("deposit", inbox.handler(apply))
    async with server, RpcClient(broker, f"{name}.rpc", timeout=10) as client:
        first = await client.call("deposit", Deposit(account="a", amount=5), returns=Receipt,
                                  headers={IDEMPOTENCY_KEY_HEADER: "req-1"})  # fmt: skip
        again = await client.call("deposit", Deposit(account="a", amount=5), returns=Receipt,
                                  headers={IDEMPOTENCY_KEY_HEADER: "req-1"})  # fmt: skip
        other = await client.call("deposit", Deposit(account="a", amount=5), returns=Receipt,
                                  headers={IDEMPOTENCY_KEY_HEADER: "req-2"})  # fmt: skip
    assert first == again == Receipt(account="a", balance=5)
    assert other == Receipt(account="a", balance=10)
    assert calls == [5, 5]
    assert await balance(store) == 10


async def test_a_request_id_for_tracing_does_not_merge_distinct_messages(
    accounts: Store, broker: Broker, name: str
) -> None:
    """``X-Request-ID`` is what HTTP services put on everything one request causes, for the logs.

    Two deposits caused by one HTTP request carry the same ``x-request-id``; they are two
    messages (two message ids), and both are applied. Only the idempotency key merges calls.
    """
    store = accounts
    inbox = Inbox(store, consumer="bank-rpc")

    async def apply(d: Deposit, tx: Any) -> Receipt:
        return Receipt(account=d.account, balance=await deposit_into(store, tx, d))

    server = RpcServer(broker, f"{name}.rpc")
    server.add("deposit", inbox.handler(apply))
    async with server, RpcClient(broker, f"{name}.rpc", timeout=10) as client:
        for _ in range(2):
            await client.call("deposit", Deposit(account="a", amount=5), headers={"x-request-id": "http-req-7"})
    assert await balance(store) == 10


async def test_tampered_stored_reply_is_an_error_reply_not_a_crash(accounts: Store, broker: Broker, name: str) -> None:
    store = accounts
    inbox = Inbox(store, consumer="bank-rpc")
    calls: list[int] = []

    async def apply(d: Deposit, tx: Any) -> Receipt:
        calls.append(d.amount)
        return Receipt(account=d.account, balance=await deposit_into(store, tx, d))

    server = RpcServer(broker, f"{name}.rpc")
    server.add("deposit", inbox.handler(apply))
    async with server, RpcClient(broker, f"{name}.rpc", timeout=10) as client:
        await client.call("deposit", Deposit(account="a", amount=5), headers={IDEMPOTENCY_KEY_HEADER: "r1"})
        async with store.transaction() as tx:
            sql = f"UPDATE {store.inbox_table} SET reply = {'$1' if isinstance(store, PostgresStore) else '?'}"  # type: ignore[attr-defined]
            if isinstance(store, PostgresStore):
                await tx.execute(sql, b"\xff not json")
            else:
                await tx.execute(sql, (b"\xff not json",))
        with pytest.raises(RemoteError) as caught:
            await client.call("deposit", Deposit(account="a", amount=5), headers={IDEMPOTENCY_KEY_HEADER: "r1"})
        assert caught.value.remote_type == "InboxRecordError"
        assert "not run again" in caught.value.remote_message
        # The server goes on.
        assert await client.call("deposit", Deposit(account="a", amount=1), returns=Receipt,
                                 headers={IDEMPOTENCY_KEY_HEADER: "r2"}) == Receipt(account="a", balance=6)  # fmt: skip
    assert calls == [5, 1]


async def test_record_made_by_hand_or_twice_is_no_crash(accounts: Store) -> None:
    """A record inserted from outside (an operator, a restore) means 'processed': skipped, no crash;
    recording the same id again in one go is absorbed too."""
    store = accounts
    seen: list[str] = []

    async def note(d: Delivery[bytes], tx: Any) -> None:
        seen.append(d.message_id or "")

    async with store.transaction() as tx:
        assert await store.inbox_record(tx, "c", "pre") is None
        again = await store.inbox_record(tx, "c", "pre")
        assert again is not None and again.reply is None
    inbox = Inbox(store, consumer="c")
    for mid in ("pre", "new", "new"):
        await inbox.handler(note)(Delivery(b"x", b"x", Envelope(b"x", message_id=mid).properties()))
    assert seen == ["new"]
    assert inbox.duplicates == 2


async def test_tampered_timestamps_do_not_break_the_cleanup(accounts: Store) -> None:
    store = accounts
    inbox = Inbox(store, consumer="c", retention=3600)

    async def nothing(d: Delivery[bytes], tx: Any) -> None:
        return None

    for mid in ("a", "b"):
        await inbox.handler(nothing)(Delivery(b"x", b"x", Envelope(b"x", message_id=mid).properties()))
    async with store.transaction() as tx:
        if isinstance(store, SqliteStore):
            await tx.execute(f"UPDATE {store.inbox_table} SET processed_at = 'garbage' WHERE message_id = 'a'")
        else:
            await tx.execute(f"UPDATE {store.inbox_table} SET processed_at = 'infinity' WHERE message_id = 'a'")  # type: ignore[attr-defined]
    assert await inbox.purge() == 0
    assert await Inbox(store, consumer="c", retention=0).purge() == 1  # 'b'; the tampered one is left, no crash


async def test_an_inbox_deletes_only_its_own_consumers_old_records(accounts: Store) -> None:
    """Two consumers on one store, each with its retention: the shorter one's cleanup leaves the other's records,
    so a message redelivered within the longer retention is still a repeat for its consumer."""
    store = accounts
    billing = Inbox(store, consumer="billing", retention=3600)
    audit = Inbox(store, consumer="audit", retention=0)
    runs: list[str] = []

    async def note(d: Delivery[bytes], tx: Any) -> None:
        runs.append(d.message_id or "")

    for inbox in (billing, audit):
        await inbox.handler(note)(Delivery(b"x", b"x", Envelope(b"x", message_id="order-7-paid").properties()))
    assert await audit.purge() == 1  # its own record, not billing's
    await billing.handler(note)(Delivery(b"x", b"x", Envelope(b"x", message_id="order-7-paid").properties()))
    assert runs == ["order-7-paid", "order-7-paid"]
    assert billing.duplicates == 1
    assert await billing.purge() == 0


async def test_message_without_an_id_is_processed_and_counted(accounts: Store) -> None:
    store = accounts
    inbox = Inbox(store, consumer="c")
    seen: list[bytes] = []

    async def note(body: bytes, tx: Any) -> None:
        seen.append(body)

    for _ in range(2):
        await inbox.handler(note)(Delivery(b"x", b"x", Envelope(b"x", message_id=None).properties()))
    assert seen == [b"x", b"x"]
    assert inbox.unidentified == 2


async def test_old_records_are_deleted_after_the_retention(accounts: Store) -> None:
    store = accounts

    async def nothing(d: Delivery[bytes], tx: Any) -> None:
        return None

    inbox = Inbox(store, consumer="c", retention=0, cleanup_interval=3600)
    await inbox.handler(nothing)(Delivery(b"x", b"x", Envelope(b"x", message_id="old").properties()))

    async with inbox:  # the cleanup task runs once at start

        async def purged() -> bool:
            return inbox.purged >= 1

        await until(purged)
    assert inbox.purged == 1


async def test_handler_must_take_the_transaction() -> None:
    async def one(d: Deposit) -> None:
        return None

    with pytest.raises(TypeError, match="transaction"):
        Inbox(SqliteStore("unused.db"), consumer="c").handler(one)


async def test_a_locked_database_requeues_the_delivery(tmp_path: Any, broker: Broker, name: str) -> None:
    """SQLite busy past its timeout (another process holds the write lock): the delivery is requeued,
    then processed once the lock is gone."""
    import sqlite3

    store = SqliteStore(tmp_path / "locked.db", busy_timeout=0.2)
    await store.open()
    await store.create_tables()
    inbox = Inbox(store, consumer="c", requeue_delay=0.05)
    seen: list[str] = []

    async def note(d: Delivery[bytes], tx: Any) -> None:
        seen.append(d.message_id or "")

    other = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.locked")
    try:
        async with Worker(queue, inbox.handler(note)) as worker:
            await queue.declare()
            await broker.publish(Envelope(b"x", message_id="m"), routing_key=queue.name)
            await wait_for(lambda: inbox.retried >= 2, timeout=20)
            assert seen == []
            other.execute("COMMIT")
            await wait_for(lambda: seen == ["m"], timeout=20)
            await wait_for(lambda: worker.completed >= 1)
    finally:
        other.close()
        await store.close()
        await broker.delete_queue(queue.name)
        await broker.delete_queue(queue.dlq_name)


async def test_rpc_request_with_a_locked_database_gets_an_error_reply_and_can_be_sent_again(
    tmp_path: Any, broker: Broker, name: str
) -> None:
    """An RPC request is not requeued when the database fails: the caller hears of it at once, and the same
    request id sent again is processed (nothing was committed the first time)."""
    import sqlite3

    store = SqliteStore(tmp_path / "rpc.db", busy_timeout=0.2)
    await store.open()
    await store.create_tables()
    calls: list[int] = []

    async def double(n: int, tx: Any) -> int:
        calls.append(n)
        return 2 * n

    server = RpcServer(broker, f"{name}.rpc")
    server.add("double", Inbox(store, consumer="math").handler(double))
    other = sqlite3.connect(tmp_path / "rpc.db", isolation_level=None)
    try:
        async with server, RpcClient(broker, f"{name}.rpc", timeout=20) as client:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(RemoteError) as caught:
                await client.call("double", 21, returns=int, headers={IDEMPOTENCY_KEY_HEADER: "q1"})
            assert caught.value.remote_type == "OperationalError"
            other.execute("COMMIT")
            assert await client.call("double", 21, returns=int, headers={IDEMPOTENCY_KEY_HEADER: "q1"}) == 42
            assert await client.call("double", 21, returns=int, headers={IDEMPOTENCY_KEY_HEADER: "q1"}) == 42
        assert calls == [21]
    finally:
        other.close()
        await store.close()
