"""A delay queue full under a length limit an operator set (`max-length`, `overflow: reject-publish`, e.g. a
vhost-wide policy of a hosted plan): the broker nacks the retry copy. The task was requeued after
``requeue_backoff`` and run again, beyond its retry policy, until the work queue's delivery limit had the broker
dead-letter it without the worker's headers: 21 runs in 21 s with ``max_attempts=3`` (RabbitMQ 3.10.8), and the
DLQ entry read reason ``delivery_limit``, attempts 0. A delay queue the broker refuses to declare already sends
the task to the DLQ (``retry-refused``); a delay queue that refuses the copy should not run it 20 times.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from amqpkit import Broker, Envelope, Reject, RetryPolicy, Worker, WorkQueue
from amqpkit.patterns.dlq import list_dead_letters

from ..brokerctl import arabbitmqctl, vhost_of
from ..waiting import until_ready, wait_for

REQUEUE_BACKOFF = 0.2  # seconds; Worker.requeue_backoff is 1 s by default


@pytest.fixture
async def work(broker: Broker, name: str) -> AsyncIterator[WorkQueue[int]]:
    queue: WorkQueue[int] = WorkQueue(broker, f"{name}.jobs", retry=RetryPolicy(max_attempts=3, initial_delay=30,
                                                                               jitter=0))  # fmt: skip
    yield queue
    for q in [queue.name, queue.dlq_name, f"{queue.name}.retry.30000"]:
        with contextlib.suppress(Exception):
            await broker.delete_queue(q)


async def test_a_task_whose_delay_queue_is_full_runs_no_more_than_its_policy_allows(
    broker: Broker, work: WorkQueue[int]
) -> None:
    vhost = vhost_of(broker.settings.urls[0])
    policy = f"{work.name}.delay-full"
    pattern = "^" + work.name.replace(".", "\\.") + "\\.retry\\."
    definition = '{"max-length": 1, "overflow": "reject-publish"}'
    await arabbitmqctl("set_policy", "-p", vhost, policy, pattern, definition, "--apply-to", "queues")
    runs: Counter[int] = Counter()
    try:

        async def handler(n: int) -> None:
            runs[n] += 1
            raise RuntimeError("the service it calls is down")

        async with Worker(work, handler, concurrency=4) as worker:
            # A copy that could not be stored was requeued after requeue_backoff: at 0.2 s (1 s by default) that
            # loop shows in a fifth of the time.
            worker.requeue_backoff = REQUEUE_BACKOFF
            for n in (1, 2):  # their retries fill the delay queue (a quorum queue takes one past max-length 1)
                await work.enqueue(n)
                await wait_for(lambda n=n: runs[n] == 1)  # type: ignore[misc]
                await asyncio.sleep(0.3)
            task = await work.enqueue(3)
            await wait_for(lambda: runs[3] >= 1)
            await asyncio.sleep(8 * REQUEUE_BACKOFF)
            # before: 9 runs in 8 s at the default requeue_backoff (1 s), and on to 21 runs (the delivery limit)
            assert runs[3] <= 3, dict(runs)
            await wait_for(lambda: worker.dead_lettered >= 1)  # task 3's copy confirmed in the DLQ (waited 8 s before)
            # It is in the DLQ, with the worker's headers, to be replayed once there is room.
            letters = {letter.task_id: letter for letter in await list_dead_letters(broker, work.name)}
            assert letters[task].reason == "retry-refused", letters
            assert letters[task].attempts == 1
    finally:
        await arabbitmqctl("clear_policy", "-p", vhost, policy)


async def test_a_task_whose_dlq_is_full_runs_once_and_reaches_the_dlq_when_it_has_room(
    broker: Broker, work: WorkQueue[int]
) -> None:
    """The DLQ itself full under an operator's length limit (``reject-publish``): the broker nacks the dead
    letter's copy. The worker requeued the task after ``requeue_backoff``, and it ran again each second for as
    long as the DLQ stayed full (a handler that rejected it: 6 runs in 6 s). Now it is rejected, so that the
    broker dead-letters it itself (the work queue dead-letters at least once: it keeps the task until the DLQ
    takes it), without the worker's headers: run once, and in the DLQ once there is room (the broker tries again
    every dead_letter_worker_publisher_confirm_timeout, 180 s by default; AMQPKIT_TEST_DLX_WAIT=240 waits for it,
    with --timeout 300). After the policy was cleared instead, it was still held 400 s later (3.10.8)."""
    vhost = vhost_of(broker.settings.urls[0])
    policy = f"{work.name}.dlq-full"
    pattern = "^" + work.dlq_name.replace(".", "\\.") + "$"
    await work.declare()
    for filler in ("filler-1", "filler-2"):  # over the limit below (a quorum queue takes one past it)
        await broker.publish(Envelope(b"0", message_id=filler), routing_key=work.dlq_name)
    await arabbitmqctl("set_policy", "-p", vhost, policy, pattern, '{"max-length": 1, "overflow": "reject-publish"}',
                       "--apply-to", "queues")  # fmt: skip
    runs: Counter[int] = Counter()
    try:

        async def handler(n: int) -> None:
            runs[n] += 1
            raise Reject("not a task this service can ever run")

        async with Worker(work, handler):
            task = await work.enqueue(1)
            await wait_for(lambda: runs[1] == 1)
            await asyncio.sleep(6)
            assert runs[1] == 1, dict(runs)  # before: 6 runs in 6 s
            # Held by the work queue for the broker to dead-letter: counted in it, not ready to deliver.
            listed = ""
            for _ in range(30):  # the broker's statistics catch up in a few seconds
                listed = await arabbitmqctl("list_queues", "-q", "-p", vhost, "name", "messages", "messages_ready")
                if f"{work.name}\t1\t0" in listed.splitlines():
                    break
                await asyncio.sleep(0.5)
            else:
                raise AssertionError(listed)
            if os.environ.get("AMQPKIT_TEST_DLX_WAIT"):  # the broker tries again every 180 s by default
                for _ in range(2):  # room in the DLQ, read below its limit
                    assert await broker.get(work.dlq_name, auto_ack=True) is not None
                await until_ready(broker, work.dlq_name, 1, timeout=float(os.environ["AMQPKIT_TEST_DLX_WAIT"]))
                letters = {letter.task_id: letter for letter in await list_dead_letters(broker, work.name)}
                assert task in letters, letters
        assert runs[1] == 1
    finally:
        await arabbitmqctl("clear_policy", "-p", vhost, policy)
