"""Dead-letter queue tools: list, replay and purge what a work queue dead-lettered.

Listing reads the DLQ one message at a time (``basic.get`` without acking,
on a channel of its own) and hands every message back at the end, in order,
so the DLQ keeps every message. It reads no further than the messages there
when it started, and keeps none of them once passed on:
:func:`iter_dead_letters` holds one message at a time however long the DLQ
is. :func:`list_dead_letters` returns a list, so it stops at ``limit``
(:data:`LIST_LIMIT` unless told otherwise). A listing of the whole DLQ
leaves it in its order; RabbitMQ (3.10) puts requeued messages behind those
still waiting, so after a listing that stopped early, the ones listed come
last.

Replaying re-publishes each task to its work queue, mandatory and with a
publisher confirm, *before* acking it in the DLQ: an interrupted replay
loses nothing (at worst a task is replayed twice: same task id), and a task
that no queue took (the work queue was deleted) stays in the DLQ and the
replay stops with :class:`~amqpkit.Unroutable`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from aiormq.abc import AbstractChannel
from pamqp.commands import Basic

from ..connection import Broker
from ..errors import map_exceptions
from ..message import Delivery
from .tasks import ATTEMPT, describe_dead_letter

__all__ = [
    "LIST_LIMIT",
    "DeadLetter",
    "iter_dead_letters",
    "list_dead_letters",
    "purge_dead_letters",
    "replay_dead_letters",
]

#: How many dead letters :func:`list_dead_letters` returns when no ``limit`` is given.
LIST_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    task_id: str | None
    error: str
    reason: str | None
    attempts: int
    age_s: float | None
    body: bytes


def dlq_name(queue: str) -> str:
    return queue if queue.endswith(".dlq") else f"{queue}.dlq"


def work_queue_name(queue: str) -> str:
    return queue[: -len(".dlq")] if queue.endswith(".dlq") else queue


async def count_dead_letters(broker: Broker, queue: str) -> int:
    """How many tasks the DLQ of ``queue`` holds (ready); TopologyError when there is no such DLQ."""
    return (await broker.queue_counts(dlq_name(queue)))[0]


async def iter_dead_letters(
    broker: Broker, queue: str, *, limit: int | None = None
) -> AsyncGenerator[DeadLetter, None]:
    """The dead-lettered tasks of work queue ``queue``, oldest first, one at a time; the DLQ is left as it was.

    At most ``limit`` (default: every task in the DLQ when it starts). The
    messages read stay unacked on the broker until the iteration ends, then
    all go back at once in their order; only the current one is held here.
    Close it when leaving early (``async with contextlib.aclosing(...)``),
    or the messages go back only when the iterator is collected.
    """
    dlq = dlq_name(queue)
    wanted = await count_dead_letters(broker, queue)
    if limit is not None:
        wanted = min(wanted, limit)
    if wanted <= 0:
        return
    channel = await broker.lowlevel.open_channel()
    last_tag = 0
    try:
        for _ in range(wanted):
            with map_exceptions(kind="queue", name=dlq):
                message = await channel.basic_get(dlq, no_ack=False)
            if not isinstance(message.delivery, Basic.GetOk):
                break
            last_tag = message.delivery.delivery_tag or last_tag
            yield _letter(broker.lowlevel.delivery(message))
    finally:
        await _give_back(channel, last_tag)


async def _give_back(channel: AbstractChannel, last_tag: int) -> None:
    """Requeue every message read on ``channel`` (its delivery tags are 1 to ``last_tag``), then close it.

    One nack per message, in order: a quorum queue puts requeued messages
    back in the order they come back, and a multiple nack of more than 32
    messages comes back in no particular order (RabbitMQ 3.10.8, measured).
    A channel that already closed has handed them back by itself.
    """
    with contextlib.suppress(Exception):
        for tag in range(1, last_tag + 1):
            if channel.is_closed:
                break
            await channel.basic_nack(tag, requeue=True, wait=False)
    with contextlib.suppress(Exception):
        await channel.close()


async def list_dead_letters(broker: Broker, queue: str, *, limit: int | None = None) -> list[DeadLetter]:
    """The first ``limit`` dead-lettered tasks of work queue ``queue`` (:data:`LIST_LIMIT` when None), oldest
    first; the DLQ is left as it was. To go through a DLQ of any length, use :func:`iter_dead_letters`."""
    bound = LIST_LIMIT if limit is None else limit
    async with contextlib.aclosing(iter_dead_letters(broker, queue, limit=bound)) as letters:
        return [letter async for letter in letters]


def _letter(delivery: Delivery[bytes]) -> DeadLetter:
    info = describe_dead_letter(delivery)
    info.pop("original_routing_key", None)
    return DeadLetter(body=delivery.body, **info)


async def replay_dead_letters(
    broker: Broker, queue: str, *, limit: int | None = None, dry_run: bool = False
) -> list[DeadLetter]:
    """Move dead-lettered tasks back to ``queue``, each confirmed there before it leaves the DLQ.

    At most ``limit``, and no more than the DLQ held when the replay started
    (a task dead-lettered again meanwhile waits for the next replay). They
    start again at attempt 1. Each is published mandatory: if no queue took
    it, it stays in the DLQ and :class:`~amqpkit.Unroutable` is raised. With
    ``dry_run`` nothing moves: the tasks that would be replayed are returned
    and the DLQ is left as it was.
    """
    dlq = dlq_name(queue)
    target = work_queue_name(queue)
    wanted = await count_dead_letters(broker, queue)
    await broker.queue_counts(target)
    if limit is not None:
        wanted = min(wanted, limit)
    if dry_run:
        async with contextlib.aclosing(iter_dead_letters(broker, queue, limit=wanted)) as letters:
            return [letter async for letter in letters]
    replayed: list[DeadLetter] = []
    for _ in range(wanted):
        delivery = await broker.get(dlq)
        if delivery is None:
            break
        headers = {k: v for k, v in delivery.headers.items() if k != "x-death"}
        headers[ATTEMPT] = 1
        replays = headers.get("x-replayed")
        headers["x-replayed"] = replays + 1 if isinstance(replays, int) else 1
        try:
            with broker.lowlevel.sending_received(delivery.body):  # the broker took it: not refused for its size
                await broker.publish(delivery.forwarded(headers), routing_key=target, mandatory=True)
        except BaseException:
            # Not stored in the work queue: it stays in the DLQ (if the channel is gone, it went back already).
            with contextlib.suppress(Exception):
                await delivery.nack(requeue=True)
            raise
        await delivery.ack()
        replayed.append(_letter(delivery))
    return replayed


async def purge_dead_letters(broker: Broker, queue: str) -> int:
    """Delete every message in the DLQ of ``queue``; returns how many there were."""
    return await broker.purge_queue(dlq_name(queue))
