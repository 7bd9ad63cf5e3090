"""An inbox made before its store (``Inbox(consumer=...)``, then ``inbox.bind(store)``), on SQLite and PostgreSQL."""

# ruff: noqa: F811  (the fixtures imported below are redefined by name as test parameters)

from __future__ import annotations

import logging
from typing import Any

import pytest

from amqpkit import Broker, TaskContext, Worker, WorkQueue
from amqpkit.outbox import Inbox, Store

from ..waiting import wait_for
from .test_inbox import Deposit, accounts, balance, deposit, deposit_into  # noqa: F401  (a fixture)


async def test_a_delivery_before_the_store_is_bound_is_requeued_then_processed_once(
    accounts: Store, broker: Broker, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = accounts
    inbox = Inbox(consumer="bank", requeue_delay=0.05)
    attempts: list[int] = []

    async def apply(d: Deposit, tx: Any, task: TaskContext) -> None:  # what follows tx is passed on
        attempts.append(task.attempt)
        await deposit_into(store, tx, d)

    queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.deposits")
    caplog.set_level(logging.WARNING, "amqpkit.inbox")
    try:
        async with Worker(queue, inbox.handler(apply)) as worker:
            await queue.declare()
            await broker.publish(deposit(5, "m1"), routing_key=queue.name)
            await wait_for(lambda: inbox.unbound >= 2)
            assert attempts == [] and await balance(store) == 0
            assert "inbox bank has no store yet (inbox.bind(store) not called): message m1 requeued" in caplog.text
            async with inbox.bind(store):
                await wait_for(lambda: inbox.processed == 1)
                await broker.publish(deposit(5, "m1"), routing_key=queue.name)  # the same message again
                await wait_for(lambda: inbox.duplicates == 1)
            assert inbox.store is None  # bound for the context only
            await wait_for(lambda: worker.completed >= 2)
        assert attempts == [1]  # a requeue is no failed attempt
        assert await balance(store) == 5
        assert await broker.queue_counts(queue.name) == (0, 0)
    finally:
        await broker.delete_queue(queue.name)
        await broker.delete_queue(queue.dlq_name)


async def test_bind_to_another_store_is_refused(accounts: Store) -> None:
    inbox = Inbox(accounts, consumer="bank")
    assert inbox.bind(accounts) is inbox
    with pytest.raises(ValueError, match="already bound"):
        inbox.bind(object())  # type: ignore[arg-type]
    async with inbox:  # a store given to the constructor stays after the context
        pass
    assert inbox.store is accounts


async def test_a_parameter_after_the_transaction_must_be_passable_by_keyword() -> None:
    async def apply(d: Deposit, tx: Any, extra: int, /) -> None: ...

    with pytest.raises(TypeError, match="positional-only"):
        Inbox(consumer="bank").handler(apply)
