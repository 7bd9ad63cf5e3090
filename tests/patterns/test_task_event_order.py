"""A task's status events arrive in the order they happened: pending before running.

``enqueue`` says "pending" and the worker says "running"; the two are sent on
different channels (and often different connections), and RabbitMQ orders
messages only within one channel. A watcher (a dashboard, a gateway's task
status page) must still never see a task run before it was pending.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from amqpkit import Broker, BrokerSettings, Delivery, PublishTimeout, RetryPolicy, Unroutable, Worker, WorkQueue

from ..reliability.proxy import FaultProxy
from ..waiting import wait_for
from ..worker_app import Job
from .status_events import status_events

TASKS = 300


async def test_pending_comes_before_running_for_every_task(broker: Broker, name: str) -> None:
    work: WorkQueue[Job] = WorkQueue(broker, f"{name}.order", events=True)

    async def handler(job: Job) -> None:
        return None

    async with status_events(broker, work) as events:
        await work.declare()
        async with Worker(work, handler, concurrency=64) as worker:
            await asyncio.gather(*(work.enqueue(Job(n=i)) for i in range(TASKS)))
            await wait_for(lambda: worker.completed == TASKS and len(events) >= 3 * TASKS, 60)
    seen: dict[str, list[str]] = defaultdict(list)
    for event in events:
        seen[event.value["task_id"]].append(event.value["status"])
    out_of_order = {task: statuses for task, statuses in seen.items() if statuses[0] != "pending"}
    assert not out_of_order, f"{len(out_of_order)} of {TASKS} tasks ran before they were pending"
    assert all(statuses == ["pending", "running", "completed"] for statuses in seen.values())


async def test_a_task_that_never_got_in_is_pending_then_failed(broker: Broker, name: str) -> None:
    work: WorkQueue[Job] = WorkQueue(broker, f"{name}.lost", events=True)
    async with status_events(broker, work) as events:
        await work.declare()
        await broker.delete_queue(work.name)  # under the WorkQueue, which believes it declared
        with pytest.raises(Unroutable):
            await work.enqueue(Job(n=1), task_id=f"{name}-t")
        await wait_for(lambda: len(events) >= 2, 10)
    seen = [e.value for e in events]
    assert [e["status"] for e in seen] == ["pending", "failed"]
    assert seen[1]["task_id"] == f"{name}-t"
    assert seen[1]["error"].startswith("not enqueued: Unroutable")


async def test_chosen_task_headers_travel_on_every_status_event(broker: Broker, name: str) -> None:
    # A request id (or a tenant) set when the task was enqueued reaches whoever watches its status.
    work: WorkQueue[Job] = WorkQueue(
        broker, f"{name}.hdr", events=True, event_headers=["x-request-id"],
        retry=RetryPolicy(max_attempts=2, initial_delay=0.05, jitter=0),
    )  # fmt: skip
    attempts = 0

    async def handler(job: Job) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("once")

    async with status_events(broker, work) as events:
        await work.declare()
        async with Worker(work, handler) as worker:
            await work.enqueue(Job(n=1), headers={"x-request-id": "req-42", "x-secret-ish": "not for watchers"})
            await wait_for(lambda: worker.completed == 1 and len(events) >= 5, 20)
    seen = [(d.value["status"], dict(d.headers)) for d in events]
    assert [status for status, _ in seen] == ["pending", "running", "retrying", "running", "completed"]
    assert all(headers.get("x-request-id") == "req-42" for _, headers in seen), seen
    assert all("x-secret-ish" not in headers for _, headers in seen), seen


async def test_a_task_whose_confirm_came_too_late_is_not_said_to_be_not_enqueued(
    broker: Broker, name: str, proxy: FaultProxy, proxied: BrokerSettings
) -> None:
    """enqueue's publish timed out waiting for its confirm, but the broker has the task: "failed" says so.

    Through a proxy that delays every chunk 0.3 s each way, the task reaches its queue while its confirm is
    still on the way back after the 0.4 s the caller allowed. The caller gets PublishTimeout; the watcher, who
    saw "pending", must not be told the task never got in (it did: a worker would run it).
    """
    work_name = f"{name}.late"
    async with Broker(proxied) as slow:
        work: WorkQueue[Job] = WorkQueue(slow, work_name, events=True)
        watched: WorkQueue[Job] = WorkQueue(broker, work_name, events=True)
        async with status_events(broker, watched) as events:
            await work.declare()
            proxy.latency = 0.3
            with pytest.raises(PublishTimeout):
                await work.enqueue(Job(n=1), task_id=f"{name}-t", timeout=0.4)
            await wait_for(lambda: len(events) >= 2, 10)
            ready, _ = await broker.queue_counts(work_name)
            assert ready == 1  # the broker has it
            seen = [e.value for e in events]
            assert [e["status"] for e in seen] == ["pending", "failed"]
            assert not seen[1]["error"].startswith("not enqueued"), seen[1]["error"]
            assert "may still be enqueued" in seen[1]["error"]
            proxy.latency = 0.0


async def test_a_task_its_handler_rejects_itself_is_said_dead_lettered(broker: Broker, name: str) -> None:
    """A handler that rejects its task itself (``delivery.reject()``): the broker dead-letters it to the DLQ. The
    Worker counted it completed and said "completed"; then, once given-back tasks were no longer counted (16fb934),
    nothing at all: a status page saw it running for ever (a review). It is a dead letter, counted and said so."""
    work: WorkQueue[Job] = WorkQueue(broker, f"{name}.self", events=True)

    async def handler(delivery: Delivery[Job]) -> None:
        await delivery.reject()

    async with status_events(broker, work) as events:
        await work.declare()
        async with Worker(work, handler) as worker:
            task = await work.enqueue(Job(n=1))
            await wait_for(lambda: [e.value["status"] for e in events][-1:] == ["dead_lettered"], 15)
            assert (worker.completed, worker.dead_lettered) == (0, 1)
    assert [e.value["status"] for e in events if e.value["task_id"] == task] == ["pending", "running", "dead_lettered"]
