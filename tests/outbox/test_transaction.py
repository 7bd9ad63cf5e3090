"""A transaction that did not commit is never reported as committed, on SQLite and PostgreSQL.

PostgreSQL aborts a transaction at the first failed statement, even when the block catches the error,
and asyncpg then sends COMMIT, which the server turns into ROLLBACK without a word. SQLite ends a
transaction under the block when the block rolls it back itself (or after SQLITE_FULL, an I/O error).
"""

# Table names in these SQL strings are the test's own.
# ruff: noqa: S608, F811  (and the fixture imported below is redefined by name as a test parameter)

from __future__ import annotations

import asyncio
import contextlib
import traceback
from typing import Any

import asyncpg
import pytest

from amqpkit import Broker, Delivery, Envelope, RetryPolicy, Worker, WorkQueue
from amqpkit.outbox import Inbox, Outbox, PostgresStore, StorageError, Store

from ..waiting import until, wait_for
from .test_inbox import accounts, accounts_table  # noqa: F401  (a fixture)


async def lose_the_transaction(store: Store, tx: Any) -> None:
    """What a handler does that leaves its transaction unable to commit, while returning normally."""
    table = accounts_table(store)
    if isinstance(store, PostgresStore):
        # "insert if absent", written as try/except: the caught error aborts the transaction
        with contextlib.suppress(asyncpg.UniqueViolationError):
            await tx.execute(f"INSERT INTO {table} VALUES ('a', 0)")
    else:
        await tx.rollback()  # SQLite: the block ends the transaction itself (as SQLite does after SQLITE_FULL)


async def ledger(store: Store) -> tuple[int, int]:
    """(accounts rows, inbox records), read afresh."""
    async with store.transaction() as tx:
        if isinstance(store, PostgresStore):
            rows = await tx.fetchval(f"SELECT count(*) FROM {accounts_table(store)}")
            records = await tx.fetchval(f"SELECT count(*) FROM {store.inbox_table}")
            return int(rows), int(records)
        cursor = await tx.execute(f"SELECT count(*) FROM {accounts_table(store)}")
        rows = (await cursor.fetchone())[0]
        cursor = await tx.execute(f"SELECT count(*) FROM {store.inbox_table}")  # type: ignore[attr-defined]
        records = (await cursor.fetchone())[0]
        return int(rows), int(records)


async def insert_account(store: Store, tx: Any, account: str) -> None:
    if isinstance(store, PostgresStore):
        await tx.execute(f"INSERT INTO {accounts_table(store)} VALUES ($1, 0)", account)
    else:
        await tx.execute(f"INSERT INTO {accounts_table(store)} VALUES (?, 0)", (account,))


async def test_a_transaction_that_did_not_commit_raises(accounts: Store) -> None:
    store = accounts
    outbox = Outbox(store)

    async def write() -> None:
        async with store.transaction() as tx:
            await insert_account(store, tx, "b")
            await outbox.add(tx, b"event", routing_key="q")
            await lose_the_transaction(store, tx)

    with pytest.raises(StorageError, match=r"nothing was committed|committed nothing"):
        await write()
    assert await ledger(store) == (1, 0)
    assert await store.counts() == {"pending": 0, "sent": 0, "failed": 0}


async def test_a_savepoint_around_the_failing_statement_still_commits(accounts: Store) -> None:
    """The way to catch a database error in a transaction that goes on (PostgreSQL): a savepoint."""
    store = accounts
    if not isinstance(store, PostgresStore):
        pytest.skip("PostgreSQL aborts the transaction; SQLite rolls back the failed statement only")
    async with store.transaction() as tx:
        await insert_account(store, tx, "b")
        with contextlib.suppress(asyncpg.UniqueViolationError):
            async with tx.transaction():
                await insert_account(store, tx, "a")
    assert await ledger(store) == (2, 0)


async def test_an_inbox_handler_whose_transaction_did_not_commit_is_not_acked(
    accounts: Store, broker: Broker, name: str
) -> None:
    """The handler writes, swallows a database error and returns: nothing was committed, so the message is
    not acked as processed; the Worker retries it, and the next attempt (which commits) is the one counted."""
    store = accounts
    inbox = Inbox(store, consumer="bank")
    attempts: list[int] = []

    async def apply(d: Delivery[bytes], tx: Any) -> None:
        attempts.append(int(d.headers.get("x-attempt", 1)))
        await insert_account(store, tx, "b")
        if len(attempts) == 1:
            await lose_the_transaction(store, tx)

    queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.deposits", retry=RetryPolicy(initial_delay=0.1, jitter=0))
    try:
        async with Worker(queue, inbox.handler(apply)) as worker:
            await queue.declare()
            await broker.publish(Envelope(b"x", message_id="m1"), routing_key=queue.name)
            await wait_for(lambda: worker.completed >= 1, timeout=30)
        assert attempts == [1, 2]
        assert worker.retried == 1
        assert inbox.processed == 1 and inbox.duplicates == 0

        async def committed_once() -> bool:
            return await ledger(store) == (2, 1)

        await until(committed_once)
    finally:
        for q in (queue.name, queue.dlq_name, f"{queue.name}.retry.100"):
            await broker.delete_queue(q)


async def test_a_transaction_cancelled_as_it_begins_leaves_the_store_usable(store: Store) -> None:
    """Cancelled while its BEGIN waited, a SQLite transaction was opened all the same (aiosqlite runs the statement
    in its thread) and never ended: every later transaction failed with "cannot start a transaction within a
    transaction". A relay stopped during its cleanup did it, and the outbox guide's program hung in CI."""

    async def begin_then_wait() -> None:
        async with store.transaction():
            await asyncio.sleep(10)

    for _ in range(5):
        task = asyncio.ensure_future(begin_then_wait())
        await asyncio.sleep(0)  # it is inside BEGIN now
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        async with store.transaction() as tx:
            await tx.execute("SELECT 1")


async def test_a_transaction_whose_commit_returned_does_not_raise_when_the_session_ends_after(
    pg_url: str, pg_schema: str
) -> None:
    """The server ends the store's sessions (pg_terminate_backend, as a restart or failover does) while 16 writers
    commit: a session ended after a block's COMMIT returned, while the pool reset the connection, raised out of
    ``transaction()`` though the row was committed (the hunt: 103 of 2,862 transactions; a writer then writes its
    change again). Only a failure before or during the COMMIT may raise now; none from the pool's release."""
    app = f"amqpkit-{pg_schema}"
    store = PostgresStore(f"{pg_url}{'&' if '?' in pg_url else '?'}application_name={app}", schema=pg_schema,
                          max_size=16)  # fmt: skip
    await store.open()
    admin = await asyncpg.connect(pg_url)
    table = f'"{pg_schema}".w'
    raised: dict[str, list[str]] = {}
    stop = asyncio.Event()

    async def writer(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                async with store.transaction() as tx:
                    await tx.execute(f"INSERT INTO {table} VALUES ($1)", f"{i}-{n}")
                    await tx.execute("SELECT pg_sleep(0.002)")
            except Exception as exc:
                frames = traceback.extract_tb(exc.__traceback__)
                raised[f"{i}-{n}"] = [f"{f.name}@{f.filename.rsplit('/', 1)[-1]}" for f in frames]
                await asyncio.sleep(0.05)

    try:
        await store.create_tables()
        await admin.execute(f"CREATE TABLE {table} (id text PRIMARY KEY)")
        writers = [asyncio.create_task(writer(i)) for i in range(16)]
        for _ in range(12):
            await asyncio.sleep(0.3)
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                                app)  # fmt: skip
        stop.set()
        await asyncio.gather(*writers)
        committed = {r["id"] for r in await admin.fetch(f"SELECT id FROM {table}")}
        after_commit = {k: v for k, v in raised.items() if any(f.startswith("release@") for f in v)}
        assert raised, "no session was ended in a transaction: the test did not test"
        assert not after_commit, (
            f"{len(after_commit)} of {len(raised)} raised from the pool's release "
            f"({len(after_commit.keys() & committed)} of them committed), e.g. {next(iter(after_commit.values()))}"
        )
    finally:
        await admin.close()
        await store.close()
