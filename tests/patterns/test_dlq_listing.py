"""A DLQ listed again and again keeps every dead letter, on RabbitMQ 4.x too.

RabbitMQ 4.0 gives every quorum queue a delivery limit of 20 unless it says otherwise, and counts every message
handed back (a nack or reject with requeue, a closed channel: measured on 4.0.5) against it. A WorkQueue's DLQ
is a quorum queue without a limit or a dead-letter exchange of its own. The listing (``amqpkit dlq list``,
``replay --dry-run``) read it with ``basic.get`` and handed back what it read: past the 20th listing the broker
dropped every dead letter, without a word. (Found by a hunt; on 3.10 the same under a ``delivery-limit`` policy.)
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterable

import pytest

from amqpkit import Broker, BrokerSettings, PublishError, Reject, RetryPolicy, Worker, WorkQueue
from amqpkit.patterns.dlq import count_dead_letters, list_dead_letters, replay_dead_letters

from ..brokerctl import arabbitmqctl, as_user, own_user, vhost_of
from ..waiting import until_ready, wait_for


@pytest.fixture
async def work(broker: Broker, name: str) -> AsyncIterator[WorkQueue[int]]:
    queue: WorkQueue[int] = WorkQueue(broker, f"{name}.jobs", retry=RetryPolicy(max_attempts=1))
    yield queue
    for q in [queue.name, queue.dlq_name, f"{queue.name}.retry.300000"]:
        with contextlib.suppress(Exception):
            await broker.delete_queue(q)


async def dead_letter(work: WorkQueue[int], tasks: Iterable[int]) -> None:
    """Each of ``tasks`` enqueued, refused by a Worker and so in the DLQ."""

    async def refuse(n: int) -> None:
        raise Reject("kept aside")

    numbers = list(tasks)
    async with Worker(work, refuse) as worker:
        for n in numbers:
            await work.enqueue(n)
        await wait_for(lambda: worker.dead_lettered == len(numbers))


async def test_listing_the_dlq_again_and_again_keeps_every_dead_letter(broker: Broker, work: WorkQueue[int]) -> None:
    await dead_letter(work, range(5))
    held = []
    for _ in range(25):  # an operator's `amqpkit dlq list` now and then, or a dashboard every minute
        await list_dead_letters(broker, work.name)
        await asyncio.sleep(0.1)  # the handed-back messages are ready again
        held.append(await count_dead_letters(broker, work.name))
    # RabbitMQ 4.0.5, before: 5 for the first 20 listings, then 0: every dead letter dropped by the broker
    assert held == [5] * 25


async def test_listing_under_an_operators_delivery_limit_keeps_every_dead_letter(
    broker: Broker, work: WorkQueue[int]
) -> None:
    """An operator's ``delivery-limit`` on the DLQ (a policy for every quorum queue of a vhost, say). On RabbitMQ
    3.x the listing handed each message back with a requeue, which counts against that limit as on 4.x; past it
    the broker dropped the letter, which has nowhere to go (before, 3.10.8, limit 2: 5 dead letters through the
    first two listings, none after the third, without a word)."""
    await dead_letter(work, range(5))
    vhost = vhost_of(broker.settings.urls[0])
    limit = f"{work.name}.dlq-limit"
    await arabbitmqctl("set_operator_policy", "-p", vhost, limit, f"^{re.escape(work.dlq_name)}$",
                       '{"delivery-limit": 2}', "--apply-to", "queues")  # fmt: skip
    held = []
    try:
        await asyncio.sleep(0.5)  # the policy reaches the queue
        for _ in range(6):
            assert len(await list_dead_letters(broker, work.name)) == 5
            await asyncio.sleep(0.1)  # the handed-back messages are ready again
            held.append(await count_dead_letters(broker, work.name))
    finally:
        await arabbitmqctl("clear_operator_policy", "-p", vhost, limit)
    assert held == [5] * 6


async def test_a_reader_without_the_right_to_write_lists_the_dlq_on_3x(broker: Broker, work: WorkQueue[int]) -> None:
    """The listing copies on RabbitMQ 3.x too (above); a user who may read the DLQ but not write to it (a
    dashboard) still lists it there, each letter handed back as before. On 4.x such a listing fails, keeping
    every letter: its default delivery limit would drop them after 20."""
    await dead_letter(work, range(5))
    url = broker.settings.urls[0]
    with own_user(url, "dlq-reader", "reader") as user:
        await arabbitmqctl("set_permissions", "-p", vhost_of(url), user, "^$", "^$", ".*")
        async with Broker(BrokerSettings(url=as_user(url, user, "reader"), publish_timeout=10)) as reader:
            if reader.server_version >= (4,):
                with pytest.raises(PublishError):
                    await list_dead_letters(reader, work.name)
            else:
                for _ in range(2):
                    assert len(await list_dead_letters(reader, work.name)) == 5
                    await until_ready(broker, work.dlq_name, 5)  # handed back: ready again shortly after
    await until_ready(broker, work.dlq_name, 5)
    assert await count_dead_letters(broker, work.name) == 5


async def test_a_replayed_task_does_not_carry_the_dlqs_delivery_count(broker: Broker, work: WorkQueue[int]) -> None:
    """The DLQ's own count of deliveries is not the task's: a dead letter handed back to the DLQ (a listing on 3.x,
    a failed replay) arrives with the broker's ``x-delivery-count`` header, and the replay copied it into the
    task it sent to the work queue, where the broker leaves a published one as it is until it counts its own. The
    replayed task then ran as attempt 3 (``Delivery.attempt``, which paces an Inbox's requeues), not 1."""

    await dead_letter(work, [7])
    # A dead letter handed back to the DLQ twice, as a listing on RabbitMQ 3.x or a replay that failed does.
    for _ in range(2):
        letter = await broker.get(work.dlq_name)
        assert letter is not None
        await letter.nack(requeue=True)
        await asyncio.sleep(0.1)
    assert len(await replay_dead_letters(broker, work.name)) == 1
    task = await broker.get(work.name)
    assert task is not None
    await task.ack()
    assert task.headers.get("x-delivery-count", 0) == 0, dict(task.headers)
    assert (task.attempt, task.headers.get("x-attempt"), task.headers.get("x-replayed")) == (1, 1, 1)


async def test_a_replay_that_fails_again_and_again_keeps_every_dead_letter(
    broker: Broker, work: WorkQueue[int]
) -> None:
    """A replay into a full work queue fails (the broker nacks the copy): the dead letter stays in the DLQ. It was
    handed back with a requeue, which counts against the DLQ's delivery limit (RabbitMQ 4.x's default 20, or an
    operator's, 2 here, on both versions); past it the broker dropped the letter, which has nowhere to go (before:
    2 letters, 1 left after a few failed replays, as `amqpkit dlq replay` run again by an operator or a cron)."""
    await dead_letter(work, range(2))
    vhost = vhost_of(broker.settings.urls[0])
    full, limit = f"{work.name}.full", f"{work.name}.dlq-limit"
    await arabbitmqctl("set_policy", "-p", vhost, full, f"^{re.escape(work.name)}$", '{"max-length": 1}',
                       "--apply-to", "queues")  # fmt: skip
    await arabbitmqctl("set_operator_policy", "-p", vhost, limit, f"^{re.escape(work.dlq_name)}$",
                       '{"delivery-limit": 2}', "--apply-to", "queues")  # fmt: skip
    try:
        await asyncio.sleep(0.5)  # the policies reach the queues
        for n in (10, 11):  # full (a quorum queue takes one past its max-length)
            with contextlib.suppress(PublishError):
                await work.enqueue(n)
        for _ in range(6):
            with pytest.raises(PublishError):
                await replay_dead_letters(broker, work.name)
            await asyncio.sleep(0.1)
            assert await count_dead_letters(broker, work.name) == 2
        await broker.purge_queue(work.name)
    finally:
        await arabbitmqctl("clear_policy", "-p", vhost, full)
        await arabbitmqctl("clear_operator_policy", "-p", vhost, limit)
    await asyncio.sleep(0.5)
    assert len(await replay_dead_letters(broker, work.name)) == 2
