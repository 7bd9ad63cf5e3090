"""Tasks larger than amqpkit's own ``max_message_size``, sent by another client: the broker took them, and the
worker can move them on (a retry, the DLQ) as it does any other.

``BrokerSettings.max_message_size`` refuses, before anything is sent, a body the broker would close the
channel over. The worker's copy of a received task went through that check too, though the broker had taken
those very bytes: a task from a client without that limit (RabbitMQ 3.10 takes up to 128 MiB by default,
amqpkit sends up to 16 MiB) could not be moved. It was requeued a second later and run again, without its
retry policy's delays, until the queue's delivery limit had the broker dead-letter it, with none of the
worker's error headers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiormq
import pytest
from pamqp.commands import Basic

from amqpkit import (
    Broker,
    BrokerSettings,
    Delivery,
    Envelope,
    MessageTooLarge,
    Queue,
    QueueType,
    RetryPolicy,
    Worker,
    WorkQueue,
)
from amqpkit.patterns.dlq import replay_dead_letters

from ..brokerctl import rabbitmqctl
from ..retrying import failed_once_then_done, retried_queue
from ..telemetry.conftest import Telemetry, otel  # noqa: F401  (the in-memory readers)
from ..waiting import until_ready, wait_for

LIMIT = 64 * 1024  # amqpkit's own limit in these tests; the tasks are larger, the broker's limit larger still
BODY = b"t" * (LIMIT + 4096)


@pytest.fixture
async def small(settings: BrokerSettings) -> AsyncIterator[Broker]:
    """A Broker whose own publishes may be no larger than LIMIT."""
    async with Broker(settings.model_copy(update={"max_message_size": LIMIT})) as b:
        yield b


async def send_from_another_client(amqp_url: str, queue: str, message_id: str, body: bytes = BODY) -> None:
    """``body`` into ``queue``, confirmed, by a bare aiormq client: no amqpkit limit on the way in."""
    conn = await aiormq.connect(amqp_url)
    try:
        channel = await conn.channel()
        await channel.basic_publish(
            body, routing_key=queue,
            properties=Basic.Properties(message_id=message_id, content_type="application/octet-stream",
                                        delivery_mode=2),
        )  # fmt: skip
    finally:
        await conn.close()


class AlwaysFails:
    """A handler that fails every run, and counts them."""

    def __init__(self) -> None:
        self.runs = 0

    async def __call__(self, delivery: Delivery[bytes]) -> None:
        self.runs += 1
        raise RuntimeError("fails")


async def test_a_task_over_amqpkits_limit_is_retried_by_its_policy(small: Broker, amqp_url: str, name: str) -> None:
    work = retried_queue(small, name)
    await work.declare()
    await send_from_another_client(amqp_url, name, "large-1")
    # before: the copy to the delay queue was refused (MessageTooLarge) and the task requeued a second later,
    # outside its policy (retried 0, forward_failures 1)
    seen = await failed_once_then_done(small, work)
    assert [d.message_id for d in seen] == ["large-1", "large-1"]
    assert seen[1].body == BODY


async def test_a_task_over_amqpkits_limit_that_keeps_failing_reaches_the_dlq_with_its_reason(
    small: Broker, amqp_url: str, name: str
) -> None:
    work: WorkQueue[Any] = WorkQueue(small, name, retry=RetryPolicy(max_attempts=1))
    await work.declare()
    handler = AlwaysFails()
    try:
        await send_from_another_client(amqp_url, name, "large-2")
        async with Worker(work, handler, concurrency=1) as worker:
            await wait_for(lambda: worker.dead_lettered == 1, 20)
        assert worker.forward_failures == 0 and handler.runs == 1
        await until_ready(small, work.dlq_name, 1)
        dead = await small.get(work.dlq_name, auto_ack=True)
        assert dead is not None and dead.message_id == "large-2" and dead.body == BODY
        assert dead.headers["x-dead-letter-reason"] == "max-attempts"
        assert dead.headers["x-error-type"] == "RuntimeError"
    finally:
        for queue in (work.name, work.dlq_name):
            await small.delete_queue(queue)


async def test_a_dead_letter_over_amqpkits_limit_is_replayed_and_does_not_hold_up_the_rest(
    small: Broker, amqp_url: str, name: str
) -> None:
    """Before: the replay raised MessageTooLarge at the large one and put it back first in the DLQ, so no later
    replay could move any dead letter behind it."""
    work: WorkQueue[Any] = WorkQueue(small, name)
    await work.declare()
    try:
        await send_from_another_client(amqp_url, work.dlq_name, "large-3")
        await send_from_another_client(amqp_url, work.dlq_name, "small-3", b"s")
        await until_ready(small, work.dlq_name, 2)
        replayed = await replay_dead_letters(small, name)
        assert [letter.task_id for letter in replayed] == ["large-3", "small-3"]
        await until_ready(small, name, 2)
        first = await small.get(name, auto_ack=True)
        assert first is not None and first.message_id == "large-3" and first.body == BODY
    finally:
        for queue in (work.name, work.dlq_name):
            await small.delete_queue(queue)


@contextlib.contextmanager
def max_message_size_lowered(limit: int) -> Iterator[None]:
    """The node's own max_message_size lowered to ``limit`` while in the block, put back after. RabbitMQ 3.10
    reads it from the application environment when it opens a channel; 4.0 from a persistent term it sets at
    boot, at each publish."""
    put = ("fun(N) -> application:set_env(rabbit, max_message_size, N), case persistent_term:get(max_message_size, "
           "undefined) of undefined -> ok; _ -> persistent_term:put(max_message_size, N) end end")  # fmt: skip
    before = rabbitmqctl("eval", "application:get_env(rabbit, max_message_size, 134217728).").strip()
    rabbitmqctl("eval", f"({put})({limit}).")
    try:
        yield
    finally:
        rabbitmqctl("eval", f"({put})({int(before)}).")


@contextlib.asynccontextmanager
async def worker_under_a_lower_limit(work: WorkQueue[Any], handler: AlwaysFails) -> AsyncIterator[Worker]:
    """A Worker on ``work``'s queue, on a Broker of its own, while the node's max_message_size is LIMIT."""
    with max_message_size_lowered(LIMIT):
        async with Broker(work.broker.settings) as lowered:
            lowered_work: WorkQueue[Any] = WorkQueue(lowered, work.name, queue=work.queue, retry=work.retry)
            async with Worker(lowered_work, handler, concurrency=1) as worker:
                yield worker


@pytest.mark.whole_broker  # every channel opened on the node while it runs gets the lowered max_message_size
async def test_a_task_the_broker_no_longer_takes_is_dead_lettered_as_it_is(
    broker: Broker,
    amqp_url: str,
    name: str,
    caplog: pytest.LogCaptureFixture,
    otel: Telemetry,  # noqa: F811
) -> None:
    """A task queued before the broker's own limit was lowered below its size (RabbitMQ 4.0 lowered the default
    from 128 to 16 MiB): no copy of it can be sent. Before, each failed copy was a PublishError naming the
    exchange '' as refused, and the task was requeued and run again every second, until the queue's delivery
    limit (20) had the broker dead-letter it. Now the broker's refusal is MessageTooLarge, and the worker
    rejects the task at once, so the broker dead-letters it whole (its queue's dead-letter exchange). The
    metrics count it as the worker does: a dead letter (reason ``rejected``, as the DLQ listing reads it), not
    the retry its instrumentation counted before the copy was refused."""
    work: WorkQueue[Any] = WorkQueue(broker, name, retry=RetryPolicy(max_attempts=3, initial_delay=0.1, jitter=0))
    handler = AlwaysFails()
    try:
        await work.declare()
        await send_from_another_client(amqp_url, name, "large-4")
        async with worker_under_a_lower_limit(work, handler) as worker:
            with pytest.raises(MessageTooLarge) as refused:
                await worker.broker.publish(Envelope(BODY), routing_key=name)
            assert refused.value.size == len(BODY) and refused.value.limit == LIMIT, refused.value
            assert "exchange" not in str(refused.value), refused.value
            await until_ready(broker, work.dlq_name, 1, timeout=10)
            await asyncio.sleep(0.5)  # time to run it again, were it requeued
        assert handler.runs == 1 and worker.retried == 0, (handler.runs, worker.retried)
        assert worker.dead_lettered == 1 and worker.forward_failures == 1
        dead = await broker.get(work.dlq_name, auto_ack=True)
        assert dead is not None and dead.message_id == "large-4" and dead.body == BODY
        assert dead.headers["x-death"][0]["reason"] == "rejected"
        assert any("over its max_message_size" in r.getMessage() for r in caplog.records), caplog.text
        assert otel.total("amqpkit.tasks.retried") == 0
        assert otel.metric("amqpkit.tasks.dead_lettered") == [
            ({"messaging.system": "rabbitmq", "amqpkit.task.dead_letter_reason": "rejected"}, 1)
        ]
    finally:
        for queue in (work.name, work.dlq_name, f"{name}.retry.100"):
            await broker.delete_queue(queue)


@pytest.mark.whole_broker
async def test_a_task_whose_queue_does_not_dead_letter_to_its_dlq_is_kept_not_rejected(
    broker: Broker, amqp_url: str, name: str
) -> None:
    """A queue spec of the user's own, whose dead-letter exchange routes nowhere (a review: the task rejected to
    it was gone, both queues empty, and the worker said the broker dead-lettered it): the task the broker no
    longer takes is kept in its queue, requeued as for any other copy that failed."""
    spec = Queue(name, type=QueueType.QUORUM, dead_letter_exchange=f"{name}.nowhere", delivery_limit=50)
    work: WorkQueue[Any] = WorkQueue(broker, name, queue=spec, retry=RetryPolicy(max_attempts=1))
    try:
        await work.declare()
        await send_from_another_client(amqp_url, name, "large-5")
        async with worker_under_a_lower_limit(work, AlwaysFails()) as worker:
            await wait_for(lambda: worker.forward_failures >= 1, 10)
        assert worker.dead_lettered == 0
        await until_ready(broker, name, 1)
        kept = await broker.get(name, auto_ack=True)
        assert kept is not None and kept.message_id == "large-5" and kept.body == BODY
    finally:
        for queue in (work.name, work.dlq_name, f"{name}.retry.100"):
            await broker.delete_queue(queue)


@pytest.mark.whole_broker
async def test_a_channel_opened_under_a_lower_limit_does_not_make_a_body_too_large(broker: Broker, name: str) -> None:
    """RabbitMQ 3.10 reads its max_message_size when it opens a channel: a channel opened while the limit was
    lower refuses a body a fresh one takes (a review: MessageTooLarge at the first refusal, and the worker
    dead-lettered a task whose next run would have succeeded). A size refusal is sent once more, on a fresh
    channel. (4.x reads the limit at each publish: there the publish goes through at once.)"""
    await broker.declare_queue(Queue(name, type=QueueType.QUORUM))
    try:
        with max_message_size_lowered(LIMIT):
            lowered = Broker(broker.settings)
            await lowered.connect()  # its publish channel opened under the lower limit
        async with lowered:
            await lowered.publish(Envelope(BODY, message_id="after"), routing_key=name)
        await until_ready(broker, name, 1)
    finally:
        await broker.delete_queue(name)


@pytest.mark.whole_broker
async def test_publishes_beside_ones_the_broker_refuses_for_size_are_confirmed(broker: Broker, name: str) -> None:
    """The broker closes the publishing channel over one body too large, and every publish in flight on it
    fails alike. Each such close counted against the small ones too, which after three were a PublishError
    quoting the other's size (a review); the small ones are sent again without counting it."""
    await broker.declare_queue(Queue(name, type=QueueType.QUORUM))
    try:
        with max_message_size_lowered(LIMIT):
            async with Broker(broker.settings) as lowered:
                small = [lowered.publish(Envelope(b"s", message_id=f"s{i}"), routing_key=name) for i in range(40)]
                large = [lowered.publish(Envelope(BODY, message_id=f"l{i}"), routing_key=name) for i in range(6)]
                outcomes = await asyncio.gather(*small, *large, return_exceptions=True)
        failed_small = [o for o in outcomes[:40] if isinstance(o, BaseException)]
        assert not failed_small, failed_small[:3]
        assert all(isinstance(o, MessageTooLarge) for o in outcomes[40:]), outcomes[40:]
        await until_ready(broker, name, 40)
    finally:
        await broker.delete_queue(name)
