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
            await wait_for(lambda: sub.failed + inbox.requeued >= 1, timeout=10)
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
