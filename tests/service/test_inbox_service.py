"""The inbox in a Service: made with the handlers, bound to the store a resource opens at startup.

The handler (``@svc.worker`` over ``@inbox.handler``) gets the message, the
inbox's transaction and, by annotation, the service's resources and its
ServiceContext, as any service handler does. On SQLite and PostgreSQL.
"""

# ruff: noqa: F811  (the fixtures imported below are redefined by name as test parameters)

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqpkit import Broker, BrokerSettings, RpcClient, WorkQueue
from amqpkit.outbox import Inbox, PostgresStore, Store
from amqpkit.service import Service, ServiceContext

from ..outbox.conftest import backend, make_store, pg_schema, pg_url  # noqa: F401  (fixtures)
from ..outbox.test_inbox import Deposit, Receipt, accounts_table, balance, deposit, deposit_into, make_accounts
from ..waiting import wait_for


@dataclass
class Bank:
    """The resource: the service's database."""

    store: Store
    opened_at: float


def build(name: str, new_store: Any) -> tuple[Service, Inbox, Inbox]:
    svc = Service(f"{name}.svc")
    deposits = Inbox(consumer="bank-deposits")
    replies = Inbox(consumer="bank-rpc")

    @svc.resource
    async def database(ctx: ServiceContext) -> AsyncIterator[Bank]:
        store = new_store()
        await store.open()
        await store.create_tables()
        await make_accounts(store)
        try:
            async with deposits.bind(store), replies.bind(store):
                yield Bank(store, asyncio.get_running_loop().time())
        finally:
            try:
                async with store.transaction() as tx:
                    await tx.execute(f"DROP TABLE IF EXISTS {accounts_table(store)}")
            finally:
                await store.close()

    @svc.worker(f"{name}.deposits", concurrency=4)
    @deposits.handler
    async def on_deposit(d: Deposit, tx: Any, bank: Bank, ctx: ServiceContext) -> None:
        assert ctx.service is svc
        await deposit_into(bank.store, tx, d)

    @svc.rpc(f"{name}.rpc")
    @replies.handler
    async def deposit_rpc(d: Deposit, tx: Any, bank: Bank) -> Receipt:
        return Receipt(account=d.account, balance=await deposit_into(bank.store, tx, d))

    return svc, deposits, replies


async def test_an_inbox_bound_at_startup_runs_each_message_once_with_the_services_resources(
    settings: BrokerSettings, broker: Broker, name: str, backend: str, tmp_path: Path, pg_url: str, pg_schema: str
) -> None:
    svc, deposits, replies = build(name, lambda: make_store(backend, tmp_path, pg_url, pg_schema))
    queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.deposits")
    try:
        async with svc.serve(settings) as running:
            store = running.context.get(Bank).store
            assert deposits.store is store and replies.store is store
            for amount, mid in [(5, "m1"), (7, "m2"), (5, "m1")]:
                await broker.publish(deposit(amount, mid), routing_key=queue.name)
            await wait_for(lambda: deposits.processed + deposits.duplicates == 3)
            assert (deposits.processed, deposits.duplicates) == (2, 1)
            assert await balance(store) == 12
            async with RpcClient(broker, f"{name}.rpc") as rpc:
                headers = {"x-idempotency-key": "r1"}
                first = await rpc.call("deposit_rpc", Deposit(account="a", amount=1), returns=Receipt,
                                       timeout=10, headers=headers)  # fmt: skip
                again = await rpc.call("deposit_rpc", Deposit(account="a", amount=1), returns=Receipt,
                                       timeout=10, headers=headers)  # fmt: skip
            assert first == again == Receipt(account="a", balance=13)  # the stored reply, not a second deposit
            assert await balance(store) == 13
            assert replies.duplicates == 1
        assert deposits.store is None and replies.store is None  # let go with the resource
        assert isinstance(store, PostgresStore) == (backend == "postgresql")
    finally:
        await broker.delete_queue(queue.name)
        await broker.delete_queue(queue.dlq_name)
        await broker.delete_queue(f"{name}.rpc")
