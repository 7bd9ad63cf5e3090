"""Dead-letter queue tools: list, replay and purge what a work queue dead-lettered.

Listing reads the DLQ one message at a time (``basic.get`` on a channel of
its own) and reads no further than the messages there when it started:
:func:`iter_dead_letters` holds one message at a time however long the DLQ
is, and :func:`list_dead_letters` returns a list, so it stops at ``limit``
(:data:`LIST_LIMIT` unless told otherwise). A listing of the whole DLQ
leaves it in its order (what is dead-lettered meanwhile may come among
them); after a listing that stopped early, the ones listed come last.

Each message is put back at the end of the DLQ as it is read, a copy (same
body, properties and headers) confirmed by the broker before the one read is
acked. A message handed back with a requeue instead counts against a quorum
queue's delivery limit, and past it the broker drops it, since a DLQ has no
dead-letter exchange of its own: RabbitMQ 4.x sets that limit to 20 unless
told otherwise (a dashboard that listed a DLQ every minute emptied it in 21
minutes, measured on 4.0.5), and on 3.x an operator's policy sets one (the
third listing under ``delivery-limit`` 2 emptied it, on 3.10.8). The copy
gives each dead letter a fresh ``message-ttl`` of a policy's, if one
applies to the DLQ, and needs the right to write to the DLQ. Where it is
refused (no write right, a DLQ full under ``reject-publish``), a listing on
4.x fails, handing back the one message it holds, which counts once; on 3.x,
which sets no limit of its own, the rest of the listing hands the messages
back with a requeue at its end, as it did before, and says so in a warning.
An interrupted listing loses nothing: at worst a dead letter is in the DLQ
twice (same task id), when the copy was confirmed and the read one not yet
acked.

Replaying re-publishes each task to its work queue, mandatory and with a
publisher confirm, *before* acking it in the DLQ: an interrupted replay
loses nothing (at worst a task is replayed twice: same task id), and a task
that no queue took (the work queue was deleted) stays in the DLQ and the
replay stops with :class:`~amqpkit.Unroutable`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from aiormq.abc import AbstractChannel
from pamqp.commands import Basic

from ..connection import Broker
from ..errors import PublishError, access_refused, map_exceptions
from ..message import Delivery
from .tasks import ATTEMPT, describe_dead_letter

log = logging.getLogger("amqpkit.dlq")

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
    """The dead-lettered tasks of work queue ``queue``, oldest first, one at a time; the DLQ keeps every one.

    At most ``limit`` (default: every task in the DLQ when it starts). Each
    one is put back at the end of the DLQ before it is yielded (see the
    module). Where that copy is refused on RabbitMQ 3.x, the messages read
    from then on stay unacked on the broker until the iteration ends, then go
    back in their order; close it when leaving early (``async with
    contextlib.aclosing(...)``).
    """
    _check_limit(limit)
    dlq = dlq_name(queue)
    wanted = await count_dead_letters(broker, queue)
    if limit is not None:
        wanted = min(wanted, limit)
    if wanted <= 0:
        return
    copying = True
    channel = await broker.lowlevel.open_channel()
    held: list[int] = []  # the delivery tags of the messages to hand back at the end, in order
    try:
        for _ in range(wanted):
            with map_exceptions(kind="queue", name=dlq):
                message = await channel.basic_get(dlq, no_ack=False)
            if not isinstance(message.delivery, Basic.GetOk):
                break
            tag = message.delivery.delivery_tag or 0
            delivery = broker.lowlevel.delivery(message)
            letter = _letter(delivery)
            if copying:
                try:
                    await _put_back_at_the_end(broker, dlq, delivery)
                except PublishError as exc:
                    if broker.server_version >= (4,):
                        raise
                    # RabbitMQ 3.x, a copy refused (a user who may read the DLQ but not write to it, a dashboard;
                    # a DLQ full under reject-publish): the rest are handed back, as every listing on 3.x did
                    # before. 3.x sets no delivery limit of its own; a policy's counts each one.
                    copying = False
                    why = "no right to write to it" if access_refused(exc) else "a copy was refused"
                    log.warning("listing DLQ %s: %s (%s), so the dead letters listed are handed back with a requeue, "
                                "which counts against a delivery limit if a policy sets one: past it the broker "
                                "drops them", dlq, why, exc)  # fmt: skip
                else:
                    with map_exceptions(kind="queue", name=dlq):
                        await channel.basic_ack(tag)
            if not copying:
                held.append(tag)
            yield letter
    finally:
        await _give_back(channel, held)


async def _give_back(channel: AbstractChannel, tags: list[int]) -> None:
    """Requeue every message read on ``channel`` and not acked (``tags``, in the order read), then close it.

    One nack per message, in order: a quorum queue puts requeued messages
    back in the order they come back, and a multiple nack of more than 32
    messages comes back in no particular order (RabbitMQ 3.10.8, measured).
    A channel that already closed has handed them back by itself.
    """
    with contextlib.suppress(Exception):
        for tag in tags:
            if channel.is_closed:
                break
            await channel.basic_nack(tag, requeue=True, wait=False)
    with contextlib.suppress(Exception):
        await channel.close()


async def _put_back_at_the_end(broker: Broker, dlq: str, delivery: Delivery[bytes]) -> None:
    """A copy of ``delivery`` at the end of the DLQ, confirmed: same body, properties and headers (``x-death``
    with them), less the count of deliveries the broker keeps itself (:meth:`~amqpkit.Delivery.forwarded`)."""
    await _send_copy(broker, delivery, dict(delivery.headers), dlq)


async def _send_copy(broker: Broker, delivery: Delivery[bytes], headers: dict[str, Any], queue: str) -> None:
    """``delivery`` with ``headers`` to ``queue``, mandatory and confirmed (a body the broker took is not refused
    for its size)."""
    with broker.lowlevel.sending_received(delivery.body):
        await broker.publish(delivery.forwarded(headers), routing_key=queue, mandatory=True)


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
    _check_limit(limit)
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
            await _send_copy(broker, delivery, headers, target)
        except Exception as exc:
            # Not stored in the work queue: it stays in the DLQ.
            await _keep(broker, dlq, delivery)
            if replayed:
                log.warning("replay of %s stopped after %d of %d dead letters: %s", queue, len(replayed), wanted, exc)
            raise
        except BaseException:
            with contextlib.suppress(Exception):  # cancelled: handed back as it is (if the channel is gone, it was)
                await delivery.nack(requeue=True)
            raise
        await delivery.ack()
        replayed.append(_letter(delivery))
    return replayed


async def _keep(broker: Broker, dlq: str, delivery: Delivery[bytes]) -> None:
    """A dead letter a replay could not move stays in the DLQ: a copy at its end, confirmed, then the one read is
    acked. Handed back with a requeue instead, each failed replay counted one more delivery of it against the
    DLQ's delivery limit (RabbitMQ 4.x's default 20, or an operator's policy), past which the broker dropped it:
    a DLQ has no dead-letter exchange of its own (1 of 2 letters gone after 21 failed replays, on 4.0.5). The copy
    not stored either, it is handed back as before."""
    try:
        await _put_back_at_the_end(broker, dlq, delivery)
    except Exception:
        with contextlib.suppress(Exception):
            await delivery.nack(requeue=True)
        return
    with contextlib.suppress(Exception):
        await delivery.ack()  # not written: the channel's close hands it back, beside its copy (one more, none lost)


async def purge_dead_letters(broker: Broker, queue: str) -> int:
    """Delete every message in the DLQ of ``queue``; returns how many there were."""
    return await broker.purge_queue(dlq_name(queue))


def _check_limit(limit: int | None) -> None:
    """ValueError for a negative ``limit``, which listed and replayed nothing, as if the DLQ were empty."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit is a number of dead letters, 0 or more (None: all), not {limit!r}")
