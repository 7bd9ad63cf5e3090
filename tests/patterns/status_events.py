"""Watching a work queue's task status events, as a dashboard would, for the tests that check them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from amqpkit import Broker, Delivery, Exchange, Subscriber, WorkQueue

STATUS_EXCHANGE = "amqpkit.tasks"


@contextlib.asynccontextmanager
async def status_events(broker: Broker, work: WorkQueue[Any]) -> AsyncIterator[list[Delivery[dict[str, Any]]]]:
    """The status events of ``work``'s tasks, in arrival order, while inside; then its queues and the exchange go."""
    seen: list[Delivery[dict[str, Any]]] = []

    async def on_event(delivery: Delivery[dict[str, Any]]) -> None:
        seen.append(delivery)

    try:
        exchange = Exchange(STATUS_EXCHANGE, type="topic")
        async with Subscriber(broker, exchange, on_event, binding_keys=[f"{work.name}.*"]):
            yield seen
    finally:
        for queue in [work.name, work.dlq_name, *(f"{work.name}.retry.{ms}" for ms in work._delay_queues)]:
            await broker.delete_queue(queue)
        await broker.delete_exchange(STATUS_EXCHANGE)
