"""A work-queue task retried twice, then dead-lettered: one trace, each attempt a span linked to the first."""

from __future__ import annotations

import contextlib
from typing import cast

from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from amqpkit import Broker, RetryPolicy, Worker, WorkQueue
from amqpkit.telemetry import FIRST_ATTEMPT_HEADER, extract

from ..brokerctl import arabbitmqctl, vhost_of
from ..waiting import until_ready, wait_for
from .conftest import Telemetry


async def test_retried_task_keeps_its_trace_into_the_dlq(broker: Broker, name: str, otel: Telemetry) -> None:
    work: WorkQueue[dict[str, int]] = WorkQueue(
        broker, f"{name}.jobs", retry=RetryPolicy(max_attempts=3, initial_delay=0.05, multiplier=1, jitter=0)
    )
    attempts: list[int] = []

    async def handle(job: dict[str, int]) -> None:
        attempts.append(job["n"])
        raise RuntimeError("still broken")

    try:
        async with Worker(work, handle):
            task_id = await work.enqueue({"n": 7})
            await until_ready(broker, work.dlq_name, 1, timeout=30)
            await wait_for(lambda: len([s for s in otel.spans() if s.kind is SpanKind.CONSUMER]) == 3)
        dead = await broker.get(work.dlq_name, auto_ack=True)
    finally:
        for q in [work.name, work.dlq_name, *(f"{work.name}.retry.{ms}" for ms in work._delay_queues)]:
            with contextlib.suppress(Exception):
                await broker.delete_queue(q)

    assert attempts == [7, 7, 7]
    enqueue = otel.named(f"send {work.name}")
    assert len(enqueue) == 1
    trace_id = enqueue[0].context.trace_id
    runs = sorted(
        (s for s in otel.spans() if s.kind is SpanKind.CONSUMER),
        key=lambda s: cast(int, s.attributes["amqpkit.task.attempt"]),
    )
    assert [s.attributes["amqpkit.task.attempt"] for s in runs] == [1, 2, 3]
    first = runs[0]
    assert first.parent is not None and first.parent.span_id == enqueue[0].context.span_id
    assert not first.links
    for run in runs:
        assert run.context.trace_id == trace_id  # one trace through every retry
        assert run.attributes["messaging.message.id"] == task_id
        assert run.attributes["error.type"] == "RuntimeError"
        assert run.status.status_code is StatusCode.ERROR
    for later in runs[1:]:
        assert [link.context.span_id for link in later.links] == [first.context.span_id]
        # Its parent is the PRODUCER span of the copy the previous attempt sent back.
        sent_back = next(s for s in otel.spans() if s.context.span_id == later.parent.span_id)
        assert sent_back.kind is SpanKind.PRODUCER
    events = [e.name for run in runs for e in run.events if e.name.startswith("amqpkit.task")]
    assert events == ["amqpkit.task.retry", "amqpkit.task.retry", "amqpkit.task.dead_letter"]

    # The dead-lettered copy still carries the trace (and the first attempt's span).
    assert dead is not None
    carried = trace.get_current_span(extract(dead.headers)).get_span_context()
    assert carried.trace_id == trace_id
    assert str(dead.headers[FIRST_ATTEMPT_HEADER]).split("-")[2] == format(first.context.span_id, "016x")

    assert otel.total("amqpkit.tasks.retried") == 2
    assert otel.total("amqpkit.tasks.dead_lettered") == 1
    assert otel.total("messaging.client.consumed.messages") == 3


async def test_a_retry_its_delay_queue_refuses_counts_as_a_dead_letter_only(
    broker: Broker, name: str, otel: Telemetry
) -> None:
    """An operator's length limit on the delay queues (``reject-publish``): the broker nacks the retry's copy and
    the task goes to the DLQ (``retry-refused``). The hooks counted a retry before the copy was sent, so that task
    was counted as retried and dead-lettered, and ``amqpkit.tasks.retried`` said more than the worker did."""
    work: WorkQueue[int] = WorkQueue(
        broker, f"{name}.jobs", retry=RetryPolicy(max_attempts=3, initial_delay=30, jitter=0)
    )
    vhost = vhost_of(broker.settings.urls[0])
    policy = f"{work.name}.delay-full"
    pattern = "^" + work.name.replace(".", "\\.") + "\\.retry\\."
    await arabbitmqctl("set_policy", "-p", vhost, policy, pattern, '{"max-length": 1, "overflow": "reject-publish"}',
                       "--apply-to", "queues")  # fmt: skip
    runs: list[int] = []

    async def handle(n: int) -> None:
        runs.append(n)
        raise RuntimeError("the service it calls is down")

    try:
        async with Worker(work, handle) as worker:
            for n in range(1, 6):  # until the full delay queue refuses one (a quorum queue takes one past the limit)
                await work.enqueue(n)
                await wait_for(lambda n=n: n in runs and worker.retried + worker.dead_lettered >= n)  # type: ignore[misc]
                if worker.dead_lettered:
                    break
            assert worker.dead_lettered == 1, (worker.retried, worker.dead_lettered)
            retried = worker.retried
    finally:
        await arabbitmqctl("clear_policy", "-p", vhost, policy)
        for q in [work.name, work.dlq_name, f"{work.name}.retry.30000"]:
            with contextlib.suppress(Exception):
                await broker.delete_queue(q)

    assert otel.total("amqpkit.tasks.retried") == retried  # before: retried + 1, the refused copy counted too
    assert otel.metric("amqpkit.tasks.dead_lettered") == [
        ({"messaging.system": "rabbitmq", "amqpkit.task.dead_letter_reason": "retry-refused"}, 1)
    ]
