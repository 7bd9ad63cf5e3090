"""A Worker whose handler is wrapped by an Inbox on PostgreSQL, while PostgreSQL is unreachable for a while
(a restart, a failover): reached through a TCP proxy that refuses connections and cuts the open ones."""

# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from amqpkit import Broker, Worker, WorkQueue
from amqpkit.outbox import Inbox, PostgresStore
from amqpkit.patterns.dlq import list_dead_letters

from ..reliability.proxy import FaultProxy
from .test_inbox import Deposit, accounts_table, balance, deposit, make_accounts


@contextlib.asynccontextmanager
async def behind_a_proxy(pg_url: str, pg_schema: str) -> AsyncIterator[tuple[PostgresStore, FaultProxy, PostgresStore]]:
    """The accounts in ``pg_schema``: a store reached directly (to read the balance) and one reached through a
    FaultProxy (which the test makes refuse and cut connections); both closed, and the proxy, after."""
    direct = PostgresStore(pg_url, schema=pg_schema)
    await direct.open()
    try:
        await direct.create_tables()
        await make_accounts(direct)
        proxy = await FaultProxy("127.0.0.1", 5432).start()
        try:
            store = PostgresStore(
                f"postgresql://postgres@127.0.0.1:{proxy.port}/test", schema=pg_schema, connect_timeout=2
            )
            await store.open()
            try:
                yield direct, proxy, store
            finally:
                await store.close()
        finally:
            await proxy.close()
    finally:
        await direct.close()


async def test_a_database_outage_under_an_inbox_worker(broker: Broker, name: str, pg_url: str, pg_schema: str) -> None:
    """Five tasks arrive while PostgreSQL is unreachable for 30 s. The inbox requeues each delivery after
    ``requeue_delay`` (1 s), as it promises, and its handler returns. Expected: no task counted completed while
    none was applied, and every task applied once PostgreSQL is back (nothing was wrong with the tasks).

    Before: the Worker took the inbox's return as success: ``worker.completed`` 92 (and a COMPLETED status event,
    and with ``idempotency=`` the id remembered as done) while 0 were applied; and every requeue counted against
    the work queue's delivery limit (20), so after ~20 s of outage the broker dead-lettered the tasks: 4 of 5 in the
    DLQ (x-death reason delivery_limit), balance 1 instead of 5, though no handler ever failed."""
    async with behind_a_proxy(pg_url, pg_schema) as (direct, proxy, store):
        inbox = Inbox(store, consumer="ledger", requeue_delay=1.0)
        applied = 0

        async def apply(d: Deposit, tx: Any) -> None:
            nonlocal applied
            await tx.execute(
                f"UPDATE {accounts_table(store)} SET balance = balance + $1 WHERE account = $2", d.amount, d.account
            )
            applied += 1

        queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.ledger")
        try:
            async with Worker(queue, inbox.handler(apply), concurrency=4) as worker:
                await queue.declare()
                proxy.refusing = True
                proxy.cut()
                for i in range(5):
                    await broker.publish(deposit(1, f"m{i}"), routing_key=queue.name)
                await asyncio.sleep(30)  # PostgreSQL away for 30 s
                during = (worker.completed, inbox.requeued, applied)
                proxy.refusing = False
                await asyncio.sleep(10)
                dead = await list_dead_letters(broker, queue.name)
                said = (
                    f"during the outage: completed={during[0]} requeued={during[1]} applied={during[2]}; after: "
                    f"completed={worker.completed} applied={applied} dead-lettered={len(dead)} "
                    f"({sorted({str(d.reason) for d in dead})}) balance={await balance(direct)}"
                )
                assert during[0] == 0 and not dead and await balance(direct) == 5, said
        finally:
            for q in (queue.name, queue.dlq_name):
                await broker.delete_queue(q)


async def test_a_database_outage_under_an_inbox_worker_with_idempotency_loses_nothing(
    broker: Broker, name: str, pg_url: str, pg_schema: str
) -> None:
    """The same with the Worker's own deduplication on (``idempotency=MemoryIdempotencyStore()``, as
    ``amqpkit worker --dedupe``): PostgreSQL away for 3 s. Before: the inbox's requeue was taken as success and the
    task id remembered as done, so its next delivery was acked unrun ("already completed"): 5 of 5 tasks lost,
    balance 0, nothing in the DLQ."""
    from amqpkit.patterns.tasks import MemoryIdempotencyStore

    async with behind_a_proxy(pg_url, pg_schema) as (direct, proxy, store):
        inbox = Inbox(store, consumer="ledger", requeue_delay=0.5)

        async def apply(d: Deposit, tx: Any) -> None:
            await tx.execute(
                f"UPDATE {accounts_table(store)} SET balance = balance + $1 WHERE account = $2", d.amount, d.account
            )

        queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.ledger")
        try:
            async with Worker(queue, inbox.handler(apply), concurrency=4, idempotency=MemoryIdempotencyStore()) as w:
                await queue.declare()
                proxy.refusing = True
                proxy.cut()
                for i in range(5):
                    await broker.publish(deposit(1, f"m{i}"), routing_key=queue.name)
                await asyncio.sleep(3)
                proxy.refusing = False
                await asyncio.sleep(5)
                dead = await list_dead_letters(broker, queue.name)
                left = await broker.queue_counts(queue.name)
                got = await balance(direct)
                assert got == 5, (
                    f"balance {got} of 5; skipped as duplicates {w.duplicates}, dead-lettered {len(dead)}, "
                    f"left in the queue {left[0]}, inbox requeued {inbox.requeued}"
                )
        finally:
            for q in (queue.name, queue.dlq_name):
                await broker.delete_queue(q)


async def test_an_rpc_request_the_inbox_requeues_gets_no_made_up_reply(
    broker: Broker, name: str, pg_url: str, pg_schema: str
) -> None:
    """An RpcServer method wrapped with ``inbox.handler(fn, requeue_on_storage_error=True)`` (documented: the
    request is requeued when the database fails), PostgreSQL unreachable. Expected: the call gets its real result
    once the request is run again, or a typed error; never a result the method did not return. Before: the
    server took the inbox's return (None) as the method's result and replied ``null`` at once: the caller got
    None for a deposit that was never applied."""
    from amqpkit import RpcClient, RpcServer

    async with behind_a_proxy(pg_url, pg_schema) as (direct, proxy, store):
        inbox = Inbox(store, consumer="ledger", requeue_delay=0.5)

        async def apply(d: Deposit, tx: Any) -> int:
            return int(
                await tx.fetchval(
                    f"UPDATE {accounts_table(store)} SET balance = balance + $1 WHERE account = $2 RETURNING balance",
                    d.amount,
                    d.account,
                )
            )

        server = RpcServer(broker, f"{name}.rpc")
        server.add("deposit", inbox.handler(apply, requeue_on_storage_error=True))
        try:
            async with server, RpcClient(broker, f"{name}.rpc", timeout=10) as client:
                proxy.refusing = True
                proxy.cut()
                call = asyncio.ensure_future(client.call("deposit", Deposit(account="a", amount=5)))
                await asyncio.sleep(2)
                proxy.refusing = False
                try:
                    result: Any = await call
                except Exception as exc:
                    result = exc
                await asyncio.sleep(2)
                got = await balance(direct)
                assert result == 5 or isinstance(result, Exception), (
                    f"the call returned {result!r}; balance {got}; inbox requeued {inbox.requeued}"
                )
        finally:
            await broker.delete_queue(f"{name}.rpc")
