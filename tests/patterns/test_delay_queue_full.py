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
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from amqpkit import Broker, RetryPolicy, Worker, WorkQueue
from amqpkit.patterns.dlq import list_dead_letters

from ..brokerctl import arabbitmqctl, vhost_of
from ..waiting import wait_for


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

        async with Worker(work, handler, concurrency=4):
            for n in (1, 2):  # their retries fill the delay queue (a quorum queue takes one past max-length 1)
                await work.enqueue(n)
                await wait_for(lambda n=n: runs[n] == 1)  # type: ignore[misc]
                await asyncio.sleep(0.3)
            task = await work.enqueue(3)
            await wait_for(lambda: runs[3] >= 1)
            await asyncio.sleep(8)
            # before: 9 runs in 8 s, one a second, and on to 21 runs (the delivery limit)
            assert runs[3] <= 3, dict(runs)
            # It is in the DLQ, with the worker's headers, to be replayed once there is room.
            letters = {letter.task_id: letter for letter in await list_dead_letters(broker, work.name)}
            assert letters[task].reason == "retry-refused", letters
            assert letters[task].attempts == 1
    finally:
        await arabbitmqctl("clear_policy", "-p", vhost, policy)
