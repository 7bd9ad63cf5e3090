"""The inbox on PostgreSQL when a setting a DBA made, not the handler, ends the statement: a lock_timeout or a
statement_timeout met while waiting on a row lock.
Nothing was committed; the inbox promises that a message is requeued when the database fails ("a lost
connection, a lock"), not handed to the pattern as a failure, which a Subscriber drops."""

# ruff: noqa: S608

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from amqpkit import Broker, Exchange, ExchangeType, Queue, Subscriber
from amqpkit.outbox import Inbox, PostgresStore

from ..waiting import wait_for
from .test_inbox import Deposit, accounts_table, balance, deposit, make_accounts


@pytest.mark.parametrize("setting", ["lock_timeout", "statement_timeout"])
async def test_a_dba_timeout_under_the_inbox_requeues_the_message(
    broker: Broker, name: str, pg_url: str, pg_schema: str, setting: str
) -> None:
    """A DBA's lock_timeout or statement_timeout (300 ms, here set for the store's sessions through the URL) ends
    the handler's UPDATE while it waits on a row another transaction holds: nothing committed; the message should
    be requeued and applied once the lock is gone. Before: LockNotAvailableError / QueryCanceledError were not
    'transient', the inbox handed them to the Subscriber, which nacked the message without requeue: gone (no
    dead-letter exchange), balance 0 instead of 5, in every run."""
    sep = "&" if "?" in pg_url else "?"
    store = PostgresStore(f"{pg_url}{sep}{setting}=300", schema=pg_schema)
    await store.open()
    await store.create_tables()
    await make_accounts(store)
    inbox = Inbox(store, consumer="ledger", requeue_delay=0.1)

    async def apply(d: Deposit, tx: Any) -> None:
        await tx.execute(
            f"UPDATE {accounts_table(store)} SET balance = balance + $1 WHERE account = $2", d.amount, d.account
        )

    holder = await asyncpg.connect(pg_url)
    queue = Queue(f"{name}.ledger", durable=True)
    exchange = Exchange(f"{name}.money", type=ExchangeType.FANOUT, durable=False, auto_delete=True)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute(f"SELECT * FROM {accounts_table(store)} WHERE account = 'a' FOR UPDATE")
        async with Subscriber(broker, exchange, inbox.handler(apply), queue=queue) as sub:
            await broker.publish(deposit(5, "m1"), exchange=exchange)
            await wait_for(lambda: sub.failed + inbox.retried >= 1, timeout=10)
            await tx.rollback()
            await asyncio.sleep(1.0)
            left = await broker.queue_counts(queue.name)
            assert sub.failed == 0, f"the message was dropped: failed={sub.failed}, queue (messages, consumers) {left}"
            await wait_for(lambda: sub.handled >= 1, timeout=10)
        assert await balance(store) == 5
    finally:
        await holder.close()
        await broker.delete_queue(queue.name)
        await store.close()


async def test_a_database_that_refuses_writes_under_the_inbox_requeues_the_message(
    broker: Broker, name: str, pg_url: str, pg_schema: str
) -> None:
    """A primary that came back as a standby after a failover answers, but refuses every write (25006,
    'cannot execute INSERT in a read-only transaction'; here the store's sessions are read-only through the URL):
    nothing was committed, and the message should wait in its queue until a writable database takes it. Before:
    ReadOnlySQLTransactionError was not 'transient', and the Subscriber dropped every message (5 of 5 in the
    hunt). The errors asyncpg raises when the server ends a session mid-query are transient too (the hunt's
    pg_terminate_backend and restarts dropped 5 to 24 messages of 3,000 as InternalClientError)."""
    writable = PostgresStore(pg_url, schema=pg_schema)
    await writable.open()
    await writable.create_tables()
    await make_accounts(writable)
    sep = "&" if "?" in pg_url else "?"
    read_only = PostgresStore(f"{pg_url}{sep}default_transaction_read_only=on", schema=pg_schema)
    await read_only.open()

    async def apply(d: Deposit, tx: Any) -> None:
        await tx.execute(
            f"UPDATE {accounts_table(writable)} SET balance = balance + $1 WHERE account = $2", d.amount, d.account
        )

    queue = Queue(f"{name}.ledger", durable=True)
    exchange = Exchange(f"{name}.money", type=ExchangeType.FANOUT, durable=False, auto_delete=True)
    try:
        refused = Inbox(read_only, consumer="ledger", requeue_delay=0.1)
        async with Subscriber(broker, exchange, refused.handler(apply), queue=queue) as sub:
            for i in range(3):
                await broker.publish(deposit(1, f"m{i}"), exchange=exchange)
            await wait_for(lambda: refused.retried >= 6 or sub.failed, timeout=10)
            assert sub.failed == 0, f"{sub.failed} dropped"
        inbox = Inbox(writable, consumer="ledger", requeue_delay=0.1)
        async with Subscriber(broker, exchange, inbox.handler(apply), queue=queue) as sub:
            await wait_for(lambda: sub.handled >= 3, timeout=15)
        assert await balance(writable) == 3
        assert inbox.processed == 3
        for exc in (
            asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
            asyncpg.AdminShutdownError(),
            asyncpg.CrashShutdownError(),
            asyncpg.ReadOnlySQLTransactionError(),
        ):
            assert read_only.transient(exc), exc
    finally:
        await broker.delete_queue(queue.name)
        await read_only.close()
        await writable.close()
