"""A task that fails once and is retried: what the tests of copies of received messages (a retry must carry
what another client sent) share."""

from __future__ import annotations

from typing import Any

from amqpkit import Broker, Delivery, RetryPolicy, Worker, WorkQueue

from .waiting import wait_for


def retried_queue(broker: Broker, name: str) -> WorkQueue[Any]:
    """A work queue whose first retry comes 0.1 s after a failure (its delay queue: ``<name>.retry.100``)."""
    return WorkQueue(broker, name, retry=RetryPolicy(max_attempts=3, initial_delay=0.1, jitter=0))


async def failed_once_then_done(broker: Broker, work: WorkQueue[Any]) -> list[Delivery[Any]]:
    """Run a Worker on ``work`` whose handler fails the first delivery and completes the second; the two
    deliveries, as the handler saw them. Checks the task was retried once and its copy could be sent. The
    queues are deleted afterwards, whatever happened."""
    seen: list[Delivery[Any]] = []

    async def handler(delivery: Delivery[Any]) -> None:
        seen.append(delivery)
        if len(seen) == 1:
            raise RuntimeError("first attempt fails")

    try:
        async with Worker(work, handler, concurrency=1) as worker:
            await wait_for(lambda: worker.completed == 1, timeout=20)
        assert worker.retried == 1 and worker.forward_failures == 0
        return seen
    finally:
        for queue in [work.name, work.dlq_name, f"{work.name}.retry.100"]:
            await broker.delete_queue(queue)
