"""Dead-letter queue tools: list, replay and purge what a work queue dead-lettered.

Listing takes the messages without acking them and hands them all back at
once (one multiple nack with requeue), so the queue keeps every message in
its order. Replaying re-publishes each task to its work queue, mandatory and
with a publisher confirm, *before* acking it in the DLQ: an interrupted
replay loses nothing (at worst a task is replayed twice: same task id), and
a task that no queue took (the work queue was deleted) stays in the DLQ and
the replay stops with :class:`~amqpkit.Unroutable`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from ..connection import Broker
from ..message import Delivery
from .work_queue import ATTEMPT, describe_dead_letter

__all__ = ["DeadLetter", "list_dead_letters", "purge_dead_letters", "replay_dead_letters"]


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


async def _take(broker: Broker, dlq: str, limit: int | None) -> list[Delivery[bytes]]:
    taken: list[Delivery[bytes]] = []
    while limit is None or len(taken) < limit:
        delivery = await broker.get(dlq)
        if delivery is None:
            break
        taken.append(delivery)
    return taken


async def _give_back(taken: list[Delivery[bytes]]) -> None:
    """Requeue every taken message with one multiple nack: they return in their order."""
    if not taken:
        return
    last = taken[-1]
    channel = last._settler.channel
    if channel is not None and not channel.is_closed:
        await channel.basic_nack(last.delivery_tag, multiple=True, requeue=True)


async def list_dead_letters(broker: Broker, queue: str, *, limit: int | None = None) -> list[DeadLetter]:
    """The dead-lettered tasks of work queue ``queue``, oldest first; the DLQ is left as it was."""
    await broker.queue_counts(dlq_name(queue))  # TopologyError when there is no such DLQ
    taken = await _take(broker, dlq_name(queue), limit)
    try:
        return [DeadLetter(body=d.body, **_described(d)) for d in taken]
    finally:
        await _give_back(taken)


def _described(delivery: Delivery[bytes]) -> dict[str, Any]:
    info = describe_dead_letter(delivery)
    info.pop("original_routing_key", None)
    return info


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
    wanted, _ = await broker.queue_counts(dlq)
    await broker.queue_counts(target)
    if limit is not None:
        wanted = min(wanted, limit)
    if dry_run:
        return await list_dead_letters(broker, queue, limit=wanted)
    replayed: list[DeadLetter] = []
    for _ in range(wanted):
        delivery = await broker.get(dlq)
        if delivery is None:
            break
        props = delivery._properties
        headers = {k: v for k, v in (props.headers or {}).items() if k != "x-death"}
        headers[ATTEMPT] = 1
        replays = headers.get("x-replayed")
        headers["x-replayed"] = replays + 1 if isinstance(replays, int) else 1
        try:
            await broker.publish(delivery.forwarded(headers), routing_key=target, mandatory=True)
        except BaseException:
            # Not stored in the work queue: it stays in the DLQ (if the channel is gone, it went back already).
            with contextlib.suppress(Exception):
                await delivery.nack(requeue=True)
            raise
        await delivery.ack()
        replayed.append(DeadLetter(body=delivery.body, **_described(delivery)))
    return replayed


async def purge_dead_letters(broker: Broker, queue: str) -> int:
    """Delete every message in the DLQ of ``queue``; returns how many there were."""
    return await broker.purge_queue(dlq_name(queue))
