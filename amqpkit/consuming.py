"""Consuming: each consumer on a channel of its own, kept attached across reconnects until cancelled.

A :class:`Consumer` is the handle :meth:`Consuming.consume` returns: its
queue, whether it is attached now, why it stopped, and :meth:`Consumer.cancel`.
Each delivery runs the callback in a task of its own. A channel the broker
closes under a consumer (or a consumer the broker cancels, e.g. its queue
deleted) is re-attached; a consumer whose queue cannot come back stops, and
its ``on_error`` hears why. The callbacks running when the broker cancels a
consumer are not cut: they get its ``grace`` to finish on the old channel
while it is re-attached on a new one (a lost channel cancels them at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import ChannelNotFoundEntity
from pamqp.commands import Basic

from . import _hooks
from ._streams import FILTER, NACKS_TAKEN, OFFSET, StreamPosition, reads_stream, refuse_auto_ack
from .channels import close_quietly, version_numbers
from .errors import (
    ChannelLimitReached,
    ConnectionLost,
    TopologyError,
    map_exceptions,
    not_found_saying,
    queue_unavailable,
    same_refusal,
)
from .message import Delivery, Settlement, delivery_from_aiormq
from .registry import TopologyRegistry, _describe
from .topology import Binding, Exchange, Queue

__all__ = ["Consumer", "ConsumerCallback", "Consuming"]

log = logging.getLogger("amqpkit.broker")

WAITING_CHECK = 5.0
"""Seconds between two asks for the channels of consumers a limit on channels left waiting, at the least."""

CANCEL_GRACE = 5.0
"""Seconds the callbacks running when the broker cancels a consumer get to finish before its old channel is
closed (unless ``consume()`` is given another ``grace``): the default grace of ``Broker.close()`` and of a
Subscriber's or an RpcServer's stop."""

DELETED_AGAIN = 5
"""Times a consumer's queue of this Broker's, deleted under it, is declared again when the consume after that
declare gets 404 (the deletion was not over), with the reconnect policy's backoff between, before it stops."""

DELETION_RECHECK = 0.25
"""Seconds, after the broker cancelled a consumer of a named queue, before a second look at a queue the first
found still there, and only then the re-attach. RabbitMQ 4.0.5 cancels a quorum queue's consumers before its
deletion is over: a declare then still found the queue and the consume after it got 404, and a consume at the
wrong moment crashed the broker's channel, which closed the whole connection (541 INTERNAL_ERROR)."""

STOP_STEP = 1.0
"""Seconds a consumer's stop waits, past its grace, for each of: the callbacks it cancelled to end, the broker's
answer to its basic.cancel, then (when that answer did not come) the channel's close. On a connection gone silent
(its packets dropped: nothing answers until the heartbeat says so) a stop ends within its grace and 3 s."""

ConsumerCallback = Callable[[Delivery[bytes]], Awaitable[None]]


class Consumer:
    """A consumer the Broker keeps attached across reconnects until :meth:`cancel`: an opaque handle.

    ``queue``, ``queue_name`` and ``consumer_tag`` say what it reads;
    ``attached`` (an event) whether it is attached now; ``cancelled`` and
    ``error`` whether it stopped, and why when it could not be re-attached;
    ``lost_in_flight`` counts deliveries whose callback a lost channel or
    connection cut short (the broker delivers them again; the callbacks
    a broker's cancel cut short past ``grace`` when its queue was deleted
    are not counted: their messages went with the queue);
    ``skipped_offsets`` counts, for a stream's consumer, the offsets it
    never got because the stream's retention removed them before it was
    attached again, or before it read them while attached (each time said
    in a WARNING);
    ``grace`` is how long the callbacks running when the broker cancels it
    (its queue deleted, a quorum queue's leader lost) get to finish on its
    old channel, while it is attached again on a new one at once;
    ``waiting_for_channel`` says why it is not attached while a limit on
    channels leaves it waiting (the Broker asks for its channel again).

    A consumer the broker refuses access to when it re-attaches it (403
    ACCESS_REFUSED: rights taken away, its vhost deleted and made again, a
    queue in exclusive use) is not stopped: an operator may lift that. It
    stays registered and not attached, ``error`` says why while
    ``cancelled`` is false, and the Broker tries again with the reconnect
    policy's backoff, declaring its queue and bindings again, until the
    broker allows it; then ``error`` is None again. Its ``on_error`` is not
    called (it has not stopped). So is a consumer of a named exclusive queue
    the Broker declared that another connection holds when it is declared
    again (405 RESOURCE_LOCKED): most often the Broker's own previous
    connection, which the broker drops a few heartbeats after the Broker
    noticed the link dead and reconnected.
    """

    __slots__ = (
        "_access_refusal",
        "_attach_lock",
        "_attached_to",
        "_broker",
        "_channel",
        "_deleted_here",
        "_gone_with_queue",
        "_on_broker_cancel",
        "_owns_queue",
        "_refused",
        "_starting",
        "_stream",
        "arguments",
        "attached",
        "auto_ack",
        "callback",
        "cancelled",
        "consumer_tag",
        "error",
        "exclusive",
        "grace",
        "inflight",
        "lost_in_flight",
        "on_error",
        "prefetch",
        "queue",
        "skipped_offsets",
        "waiting_for_channel",
    )

    def __init__(
        self,
        broker: Consuming,
        queue: Queue,
        callback: ConsumerCallback,
        prefetch: int,
        auto_ack: bool,
        exclusive: bool,
        arguments: dict[str, Any],
        on_error: Callable[[BaseException], None] | None = None,
        grace: float = CANCEL_GRACE,
    ) -> None:
        self._broker = broker
        self.grace = grace
        self.queue = queue
        self.callback = callback
        self.prefetch = prefetch
        self.auto_ack = auto_ack
        self.exclusive = exclusive
        self.arguments = arguments
        self.on_error = on_error
        self.consumer_tag = f"amqpkit.{uuid.uuid4().hex[:16]}"
        self.cancelled = False
        self.attached = asyncio.Event()
        self.inflight: set[asyncio.Task[Any]] = set()
        # why it stopped, when it could not be re-attached; or, not cancelled, why the broker refuses it for now
        self.error: BaseException | None = None
        self.lost_in_flight = 0
        self.skipped_offsets = 0  # a stream's offsets its retention removed before a re-attach got to them
        # callbacks of an old channel whose queue the broker's cancel found deleted: cut short, not lost_in_flight
        self._gone_with_queue: set[asyncio.Task[Any]] = set()
        # why it is not attached while a limit on channels leaves it waiting (the Broker asks again), else None
        self.waiting_for_channel: ChannelLimitReached | None = None
        self._channel: AbstractChannel | None = None
        # True while consume() starts it: that call attaches it, or raises and drops it (a reconnect leaves it be,
        # and gives it in _refused why its queue could not be restored, for consume() to raise)
        self._starting = False
        self._refused: BaseException | None = None
        self._attach_lock = asyncio.Lock()
        # consume() declared its queue, one the broker removes with its last consumer or connection (server-named,
        # exclusive or auto-delete): forgotten again when it is cancelled (see Consuming._detach)
        self._owns_queue = False
        # the broker's refusal of access (403) it waits out, tried again in the background (Consuming._retry_refused)
        self._access_refusal: TopologyError | None = None
        # a stream's consumer: where it got to, which a re-attach resumes from (amqpkit._streams); else None
        self._stream = StreamPosition() if reads_stream(queue, arguments) else None
        # called when the broker cancels it, before it is attached again (a pattern's own hook: see RpcClient)
        self._on_broker_cancel: Callable[[], None] | None = None
        # the queue name it was last attached to; and whether this Broker's delete_queue() is deleting that queue
        # (a broker cancel then stops it, quietly: Consuming._on_broker_cancel)
        self._attached_to: str | None = None
        self._deleted_here = False

    async def cancel(self, *, grace: float = 0.0) -> None:
        """Stop receiving; wait up to ``grace`` seconds for running callbacks."""
        await self._broker._detach(self, grace=grace)

    @property
    def queue_name(self) -> str:
        return self._broker.queue_name(self.queue)

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else ("attached" if self.attached.is_set() else "detached")
        return f"<Consumer {self.consumer_tag} on {self.queue.name or '(server-named)'!r} {state}>"


MAX_PREFETCH = 65535
"""The largest prefetch a basic.qos carries (a 16-bit count)."""


class Consuming(TopologyRegistry):
    """The Broker's consuming layer (a base of :class:`~amqpkit.Broker`)."""

    @property
    def consumers(self) -> tuple[Consumer, ...]:
        """The consumers this Broker keeps attached (a snapshot): ``attached``, ``queue_name``, ``cancel()``."""
        return tuple(self._consumers.values())

    def detached_consumers(self) -> list[str]:
        """Queue names of consumers not attached right now (e.g. while a re-attach is under way)."""
        return [c.queue.name or c.consumer_tag for c in self._consumers.values() if not c.attached.is_set()]

    async def consume(
        self,
        queue: Queue,
        callback: ConsumerCallback,
        *,
        prefetch: int = 16,
        auto_ack: bool = False,
        exclusive: bool = False,
        arguments: dict[str, Any] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        declare: bool = True,
        grace: float = CANCEL_GRACE,
    ) -> Consumer:
        """Attach ``callback`` to ``queue`` on a channel of its own, kept attached across reconnects.

        The queue is declared first (and remembered) unless ``declare=False``,
        for a queue someone else owns. Each delivery runs ``callback`` in its
        own task; settle it there (unless ``auto_ack``). A delivery whose
        callback raises before settling it stays unsettled (the broker
        delivers it again once the channel closes); a stream's is rejected,
        which leaves its message in the stream (unsettled, it would be read
        again at each re-attach, with everything after it).

        When the broker cancels the consumer (its queue deleted, a quorum
        queue's leader lost), it is attached again at once on a new channel
        (its queue declared again); the callbacks running then get ``grace``
        seconds to finish on the old channel, where their settlements still
        land, before that channel is closed and those still running are
        cancelled (their messages go back to the queue if it is still there;
        a deleted queue's went with it).

        A consumer of a stream (an ``x-stream-offset`` argument, or a queue
        declared as a stream) resumes where it got to whenever it is attached
        again (a reconnect, a cancel by the broker, a lost channel), at least
        once: from the lowest offset handed to ``callback`` and not yet
        settled, else the last one settled + 1. Until something was
        delivered the ``x-stream-offset`` given stands: from ``"next"``, what
        is appended while it is detached before its first delivery is not
        delivered (where ``"next"`` pointed cannot be read over AMQP 0-9-1);
        start from a stored offset, ``"first"`` or a timestamp where that
        matters. A stream deleted
        (under its consumer, or while the connection is down) and declared
        again by the Broker is a new one, read from its first message; one
        deleted and declared again by someone else meanwhile cannot be told
        from the old one (amqpkit._streams). RabbitMQ delivers a stream only
        to a consumer that acks, with a prefetch: ``auto_ack=True`` on a queue
        declared as a stream (or with an ``x-stream-offset``) raises
        ValueError, before anything is sent (the broker would close the whole
        connection).
        """
        if not 0 <= prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch must be 0 (no limit) to {MAX_PREFETCH}, the most AMQP carries; got {prefetch}")
        refuse_auto_ack(queue, arguments or {}, auto_ack)
        declared = False
        if declare and queue not in self._queues:
            await self.declare_queue(queue)
            declared = True
        consumer = Consumer(
            broker=self,
            queue=queue,
            callback=callback,
            prefetch=prefetch,
            auto_ack=auto_ack,
            exclusive=exclusive,
            arguments=dict(arguments or {}),
            on_error=on_error,
            grace=grace,
        )
        consumer._starting = True
        consumer._owns_queue = declared and (not queue.name or queue.exclusive or queue.auto_delete)
        self._consumers[consumer.consumer_tag] = consumer
        ready = False
        try:
            # A reconnect meanwhile leaves it to this call (_starting): what it cannot attach is this caller's
            # error, not a consumer said to wait for a channel (or stopped) that the caller then never gets.
            await self._ready()
            ready = True
            self._raise_refused(consumer)
            await self._attach(consumer)
        except ConnectionLost:
            if not ready:  # waited for the connection until the deadline already: not a second time
                await self._drop_unstarted(consumer)
                raise
            # The connection dropped under the attach: wait for the reconnect and attach it then, rather than
            # leave an attached consumer nobody holds.
            try:
                await self._ready()
                self._raise_refused(consumer)
                await self._attach(consumer)
            except BaseException:
                await self._drop_unstarted(consumer)
                raise
        except BaseException:
            await self._drop_unstarted(consumer)
            raise
        finally:
            consumer._starting = False
        return consumer

    async def _drop_unstarted(self, consumer: Consumer) -> None:
        """A consumer consume() could not start: dropped, with the queue consume() declared for it, which no
        consumer ever read and the broker so never removes by itself (an auto-delete queue goes with its last
        consumer; a server-named one lives as long as the connection)."""
        name = ""
        if consumer._owns_queue:
            with contextlib.suppress(TopologyError):
                name = self.queue_name(consumer.queue)
        await self._detach(consumer, grace=0)
        if name and self.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.delete_queue(name, if_unused=True), 5)

    @staticmethod
    def _raise_refused(consumer: Consumer) -> None:
        """The reconnect could not restore the queue ``consumer`` is being started on: consume() raises why."""
        if consumer._refused is not None:
            raise consumer._refused

    async def get(self, queue: Queue | str, *, auto_ack: bool = False) -> Delivery[bytes] | None:
        """One message from ``queue`` (basic.get), or None when it is empty."""
        name = queue if isinstance(queue, str) else self.queue_name(queue)
        await self._ready()
        channel = await self._channel("get", confirms=False)
        with map_exceptions(kind="queue", name=name):
            message = await channel.basic_get(name, no_ack=auto_ack)
        if not isinstance(message.delivery, Basic.GetOk):
            return None
        return delivery_from_aiormq(message, auto_ack=auto_ack)

    async def _attach(self, consumer: Consumer) -> None:
        """Attach ``consumer`` on the current connection, unless it is attached already (or cancelled)."""
        async with consumer._attach_lock:
            if consumer.cancelled:
                return
            if consumer._channel is not None and not consumer._channel.is_closed:
                return
            await self._attach_now(consumer)

    async def _attach_now(self, consumer: Consumer) -> None:
        if consumer.cancelled:
            return
        conn = self._conn
        if conn is None or conn.is_closed:
            raise ConnectionLost("not connected")
        queue_name = self.queue_name(consumer.queue)
        with map_exceptions(kind="queue", name=queue_name):
            channel = await self._new_channel(conn, publisher_confirms=False)
            await channel.basic_qos(prefetch_count=consumer.prefetch)
            arguments, on_message = self._consuming_with(consumer, conn.server_properties)
            channel.on_consumer_cancel_callbacks.add(
                lambda frame: self._on_broker_cancel(consumer, channel, queue_name)
            )
            await channel.basic_consume(
                queue_name,
                on_message,
                no_ack=consumer.auto_ack,
                exclusive=consumer.exclusive,
                arguments=arguments,
                consumer_tag=consumer.consumer_tag,
            )
        if consumer.cancelled or self._closing:
            # Cancelled while its consume was on the way (cancel() does not wait for an attach under way): closed
            # again, which returns what was delivered meanwhile, rather than left running for nobody.
            await close_quietly(channel)
            return
        consumer._channel = channel
        consumer._attached_to = queue_name
        consumer._deleted_here = False  # attached again: whatever delete marked it did not take its queue
        if consumer.waiting_for_channel is not None:
            consumer.waiting_for_channel = None
            log.info("consumer %s attached to %s after waiting for a channel", consumer.consumer_tag, queue_name)
        if consumer._access_refusal is not None:
            consumer._access_refusal = None
            consumer.error = None
            log.info("consumer %s attached to %s: the broker allows it again", consumer.consumer_tag, queue_name)
        consumer.attached.set()
        generation = self.generation
        channel.closing.add_done_callback(lambda _: self._on_consumer_channel_closed(consumer, channel, generation))
        log.debug("consumer %s attached to %s", consumer.consumer_tag, queue_name)

    def _consuming_with(
        self, consumer: Consumer, server_properties: Mapping[str, Any]
    ) -> tuple[dict[str, Any] | None, Callable[[DeliveredMessage], Any]]:
        """The arguments of ``consumer``'s attach and what runs each of its deliveries. A stream's consumer
        resumes where it got to, at least once (amqpkit._streams), and notes each delivery; the others, as given.
        ``server_properties``: what the broker said of itself (whether a nack of a stream's delivery is an ack)."""
        if consumer._stream is None:
            # aiormq runs it in a task of its own per delivery: _dispatch itself, no coroutine wrapped around it.
            return consumer.arguments or None, functools.partial(self._dispatch, consumer)
        arguments, read = consumer._stream.attach(consumer.arguments)
        if read.start is not None:
            log.debug("consumer %s resumes %s from offset %d", consumer.consumer_tag, self._shown(consumer), read.start)
            if FILTER not in arguments:  # a filter leaves out offsets by itself
                read.skipped = functools.partial(self._offsets_skipped, consumer)
        if FILTER not in arguments:
            read.jumped = functools.partial(self._offsets_overtaken, consumer)
        if version_numbers(server_properties) < NACKS_TAKEN:
            read.nack_as_ack = functools.partial(self._nacked_as_ack, consumer)
        return arguments or None, functools.partial(self._dispatch, consumer, deliver=read.delivery)

    def _offsets_skipped(self, consumer: Consumer, asked: int, first: int) -> None:
        """A resumed attach of ``consumer`` asked for offset ``asked`` and was first handed ``first``: the
        stream's retention removed what lay between (amqpkit._streams). Said and counted; nothing brings it back."""
        skipped = first - asked
        consumer.skipped_offsets += skipped
        log.warning("consumer %s on %s resumed at offset %d, the broker started at %d: %d offsets skipped, removed "
                    "by the stream's retention (x-max-length-bytes, x-max-age) before it was attached again; their "
                    "messages are not delivered", consumer.consumer_tag, self._shown(consumer), asked, first,
                    skipped)  # fmt: skip

    def _offsets_overtaken(self, consumer: Consumer, before: int, after: int) -> None:
        """``consumer`` was handed offset ``after`` next after ``before``, in one attach: the stream's retention
        removed what lay between before the consumer got to it (amqpkit._streams). Said and counted, as a resumed
        attach's gap is; nothing brings it back."""
        skipped = after - before - 1
        consumer.skipped_offsets += skipped
        log.warning("consumer %s on %s was handed offset %d after %d: %d offsets skipped, removed by the stream's "
                    "retention (x-max-length-bytes, x-max-age, or a policy's) before it read them; their messages "
                    "are not delivered", consumer.consumer_tag, self._shown(consumer), after, before,
                    skipped)  # fmt: skip

    def _nacked_as_ack(self, consumer: Consumer, outcome: Settlement) -> None:
        """A delivery of ``consumer``'s stream was nacked or rejected, and written as an ack (amqpkit._streams);
        said once per consumer."""
        assert consumer._stream is not None
        if not consumer._stream.said_nack_as_ack:
            consumer._stream.said_nack_as_ack = True
            log.debug("consumer %s on %s: a delivery %s is acked: this broker closes the connection at a nack or "
                      "reject of a stream's delivery, which would do nothing else there (a stream neither requeues "
                      "nor dead-letters); said once", consumer.consumer_tag, self._shown(consumer),
                      outcome.value)  # fmt: skip

    async def _dispatch(
        self,
        consumer: Consumer,
        message: DeliveredMessage,
        deliver: Callable[..., Delivery[bytes]] = delivery_from_aiormq,
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            consumer.inflight.add(task)
        delivery: Delivery[bytes] | None = None
        try:
            delivery = deliver(message, auto_ack=consumer.auto_ack)
            if _hooks.consume is not None:  # amqpkit.telemetry: the callback in a CONSUMER span
                await _hooks.consume(consumer, delivery)
            else:
                await consumer.callback(delivery)
        except asyncio.CancelledError:
            # cut short by a lost channel or connection, not by a stop; nor after its queue was deleted (not
            # delivered again: the broker's cancel says so, see _retire_channel)
            if not consumer.cancelled and task not in consumer._gone_with_queue:
                consumer.lost_in_flight += 1
            raise
        except Exception:
            # Patterns settle and log their own failures; this is the last net.
            log.exception("consumer %s callback failed", consumer.consumer_tag)
            if consumer._stream is not None and delivery is not None:
                await self._reject_failed(consumer, delivery)
        finally:
            if task is not None:
                consumer.inflight.discard(task)

    async def _reject_failed(self, consumer: Consumer, delivery: Delivery[bytes]) -> None:
        """The callback of a stream's ``consumer`` raised and left ``delivery`` unsettled: rejected. Left so, it held
        a prefetch slot for good, and every re-attach read the stream again from it, with all read since
        (amqpkit._streams). A stream neither requeues nor dead-letters: its message stays in the stream."""
        settler = delivery._settler
        if settler.outcome is not None or settler.writing is not None:
            return
        try:
            await delivery.reject()
        except Exception as exc:  # its channel gone meanwhile: resumed from it, as any delivery left unsettled
            log.debug("consumer %s: could not reject the delivery its callback failed on: %r", consumer.consumer_tag,
                      exc)  # fmt: skip
            return
        log.warning("consumer %s on %s: the delivery its callback failed on (offset %s) is rejected; it stays in the "
                    "stream", consumer.consumer_tag, self._shown(consumer), delivery.headers.get(OFFSET))  # fmt: skip

    def _on_consumer_channel_closed(self, consumer: Consumer, channel: AbstractChannel, generation: int) -> None:
        if consumer.cancelled or self._closing or consumer._channel is not channel:
            return
        consumer.attached.clear()
        consumer._channel = None
        if generation != self.generation or self._conn is None or self._conn.is_closed:
            return  # the reconnect re-attaches it
        log.warning("consumer %s lost its channel; re-attaching", consumer.consumer_tag)
        self._spawn(self._reattach(consumer))

    def _on_broker_cancel(self, consumer: Consumer, channel: AbstractChannel, queue_name: str) -> None:
        """The broker cancelled the consumer (queue deleted, node down): declare the queue again and re-attach it
        on a new channel at once, and give the callbacks running on the old one ``consumer.grace`` seconds to
        finish before that channel is closed (:meth:`_retire_channel`). ``queue_name``: what it was attached to.
        A queue this Broker's :meth:`delete_queue` deleted stops it instead (:meth:`_deleted_here_under`).

        Closing the old channel at once (as before) cancelled every running callback, after whatever side effect
        it had made: an RpcServer sent no reply (it goes on the Broker's publish channel, which the cancel does not
        touch), and each caller waited out its whole timeout (4 of 4 calls, 10 s each, in a hunt)."""
        if consumer.cancelled or self._closing:
            return
        if consumer._deleted_here:
            self._deleted_here_under(consumer, channel, queue_name)
            return
        log.warning("broker cancelled consumer %s on %s; re-attaching", consumer.consumer_tag, self._shown(consumer))
        consumer.attached.clear()
        consumer._channel = None
        if consumer._on_broker_cancel is not None:
            try:
                consumer._on_broker_cancel()
            except Exception:
                log.exception("the broker-cancel hook of consumer %s failed", consumer.consumer_tag)

        async def reattach_then_retire() -> None:
            # The callbacks of the old channel: aiormq made a task for each delivery it read before the cancel,
            # each has run its first step (queued before this task's) and so is in inflight; nothing of the new
            # channel is there yet (it is attached below).
            running = {t for t in consumer.inflight if not t.done()}
            named = not consumer.queue.server_named
            # A queue not ours to declare again: the re-attach would send only its basic.consume.
            foreign = named and consumer.queue not in self._queues
            there: bool | None = None
            if consumer._stream is not None or running or named:
                there = await self._still_there(consumer)  # asked before the re-attach declares it again
                log.debug("consumer %s: its queue there after the cancel: %s", consumer.consumer_tag, there)
            if named and there is True:
                # RabbitMQ 4.0.5 cancels a quorum queue's consumers before a passive declare finds the queue gone;
                # a declare or consume meanwhile meets the deletion half done (see DELETION_RECHECK).
                await asyncio.sleep(DELETION_RECHECK)
                there = await self._still_there(consumer)
            if foreign and there is False:
                # Deleted by its owner: stopped without that basic.consume. On RabbitMQ 4.0.5 a consume racing a
                # quorum queue's deletion crashed the broker's channel, and the broker closed the whole connection
                # (541 INTERNAL_ERROR), every other consumer and publish of it with it.
                self._spawn(self._retire_channel(consumer, channel, running, there))
                self._stop_consumer(consumer, _deleted(self.queue_name(consumer.queue)))
                return
            if consumer._stream is not None and there is False:
                self._new_stream(consumer, "was deleted under it")
            if consumer._stream is not None:
                # A stream's consumer resumes at its lowest unsettled offset: attached again while these still
                # ran, it would be handed them again at once, to run beside themselves. Their grace first.
                await self._retire_channel(consumer, channel, running, there)
            else:
                self._spawn(self._retire_channel(consumer, channel, running, there))
            await self._reattach(consumer, redeclare=True)

        self._spawn(reattach_then_retire())

    def _deleted_here_under(self, consumer: Consumer, channel: AbstractChannel, queue_name: str) -> None:
        """The broker cancelled ``consumer`` as this Broker's :meth:`delete_queue` deleted its queue: it stops,
        quietly, as asked. Its running callbacks get their grace (their messages went with the queue); its owner
        hears why (``error``, ``on_error``). Before, it was taken for a queue deleted by someone else: a WARNING
        that it re-attaches, a passive declare, then an ERROR that it stopped, for a deletion its user asked for."""
        running = {t for t in consumer.inflight if not t.done()}
        self._spawn(self._retire_channel(consumer, channel, running, False))
        self._stop_consumer(consumer, _deleted_here(queue_name))

    def _deleting(self, name: str) -> list[Any]:
        marked = [
            c for c in self._consumers.values()
            if not c.cancelled and not c._deleted_here
            and (c._attached_to == name or (c._attached_to is None and c.queue.name == name))
        ]  # fmt: skip
        for consumer in marked:
            consumer._deleted_here = True
        return marked

    def _not_deleting(self, marked: list[Any]) -> None:
        for consumer in marked:
            consumer._deleted_here = False

    async def _retire_channel(
        self, consumer: Consumer, channel: AbstractChannel, running: set[asyncio.Task[Any]], there: bool | None
    ) -> None:
        """Close the channel the broker cancelled ``consumer`` on once the callbacks ``running`` on it have ended,
        or ``consumer.grace`` seconds have passed; those still running then are cancelled, and said. ``there``:
        whether its queue was still there after the cancel (False: deleted, its messages are not delivered
        again, so not counted as ``lost_in_flight``)."""
        if there is False:
            consumer._gone_with_queue |= running
        try:
            if running:
                _, overdue = await asyncio.wait(running, timeout=consumer.grace)
                if overdue and consumer.cancelled:
                    # A pattern's stop meanwhile gives them its own grace, and cancels them after it: not cut short
                    # here by closing their channel. A consumer the Broker stopped (its queue could not come back)
                    # cancels nothing: after one more grace they are cut short all the same.
                    _, overdue = await asyncio.wait(overdue, timeout=consumer.grace)
                if overdue:
                    for task in overdue:
                        task.cancel()
                    await asyncio.wait(overdue, timeout=5)
                cut = sum(1 for t in running if t.cancelled())
                if cut:
                    fate = {
                        False: "its queue was deleted: their messages went with it and are not delivered again",
                        True: "their messages go back to the queue, and the broker delivers them again",
                        None: "if its queue is still there, the broker delivers their messages again",
                    }[there]
                    log.warning("consumer %s on %s: %d of %d callbacks running when the broker cancelled it were "
                                "cut short (grace %.3g s); %s", consumer.consumer_tag, self._shown(consumer), cut,
                                len(running), consumer.grace, fate)  # fmt: skip
        finally:
            consumer._gone_with_queue -= running
            if not channel.is_closed:
                # Returns whatever is still unacked on it to its queue, if the queue is still there.
                await close_quietly(channel)

    async def _still_there(self, consumer: Consumer) -> bool | None:
        """Whether ``consumer``'s queue is there (one passive declare), after the broker cancelled it: False when
        it was deleted; None when that cannot be told (a refusal, the connection down or lost meanwhile)."""
        if not self.is_connected:
            return None
        try:
            return await asyncio.wait_for(self._exists(self.queue_name(consumer.queue)), 10)
        except Exception as exc:  # the connection went meanwhile: the reconnect asks again (a stream's)
            log.debug("consumer %s: could not ask whether its queue is still there: %r", consumer.consumer_tag, exc)
            return None

    async def _streams_gone(self, queues: Iterable[Queue], *, why: str = "while the connection was down") -> None:
        """Before ``queues`` are declared again (a reconnect, or once the broker allows them after a refusal):
        whether each that a consumer reads as a stream is still there. One that is not (404) was deleted while the
        connection was down, and the declare that follows makes a new stream, whose offsets start at 0 again: its
        consumers read it from its first message, not from where they got to in the old one, which would skip
        that many of the new one's messages. One passive declare per such stream, at that time only. A stream
        deleted and declared again by someone else meanwhile is still there to this question (amqpkit._streams)."""
        readers: dict[Queue, list[Consumer]] = {}
        for consumer in self._consumers.values():
            if consumer._stream is not None and not consumer.cancelled and consumer.queue.name:
                readers.setdefault(consumer.queue, []).append(consumer)
        for queue in [q for q in queues if q in readers]:
            if await self._exists(queue.name) is False:
                for consumer in readers[queue]:
                    self._new_stream(consumer, f"was deleted {why}")

    def _new_stream(self, consumer: Consumer, why: str) -> None:
        """``consumer``'s stream is declared again as a new one: read from its first message (amqpkit._streams)."""
        assert consumer._stream is not None
        had = consumer._stream.new_stream()
        where = (
            f"offset {had}, where it had got to in the old one"
            if had is not None
            else f"{consumer.arguments.get(OFFSET, 'next')!r} as given to consume() (nothing delivered yet)"
        )
        log.warning("consumer %s: its stream %s %s, and is declared again as a new stream, whose offsets start at 0: "
                    "read from its first message, not from %s", consumer.consumer_tag, self._shown(consumer), why,
                    where)  # fmt: skip

    async def _reattach(self, consumer: Consumer, *, redeclare: bool = False) -> None:
        # Only a lost connection is worth trying again; a refused declare or a missing queue goes straight to the
        # consumer's on_error. While the connection is down, the reconnect attaches it however long that takes (a
        # limit of 10 attempts here stopped it for good after an outage of about 10 publish timeouts); with the
        # connection up, a channel lost under the attach is tried again 10 times.
        failures = 0
        deleted = 0  # 404s for a queue of ours the declare had just found there (see DELETED_AGAIN)
        try:
            while True:
                if consumer.cancelled or self._closing:
                    return
                if consumer._channel is not None or consumer.waiting_for_channel is not None:
                    return  # a reconnect got there first, or left it waiting for a channel (tried again there)
                if consumer._access_refusal is not None:
                    return  # waits for the broker to allow it (Consuming._retry_refused)
                if not self.is_connected:
                    await self._connected.wait()  # the reconnect attaches it, or says why not
                    continue
                try:
                    await self._attach_again(consumer, redeclare=redeclare)
                    return
                except TopologyError as exc:
                    if not (redeclare and self._deleted_as_declared(consumer, exc, deleted)):
                        raise
                    deleted += 1
                    await asyncio.sleep(self._retry_delay(deleted - 1))
                except ConnectionLost:
                    if not self.is_connected:
                        continue
                    failures += 1
                    if failures >= 10:
                        raise
                    await asyncio.sleep(self._retry_delay(failures - 1))
        except Exception as exc:
            if consumer.cancelled or self._closing:
                return
            if isinstance(exc, ChannelLimitReached):
                self._wait_for_channel(consumer, exc)
                return
            if isinstance(exc, TopologyError) and self._waits_out(consumer.queue, exc):
                # e.g. its vhost being deleted: the broker refuses access, then cancels the consumer, then closes
                # the connection; the vhost made again, the reconnect attaches it. Or its queue's node down.
                self._wait_for_access(consumer, exc)
                return
            self._stop_consumer(consumer, exc)

    def _deleted_as_declared(self, consumer: Consumer, exc: TopologyError, times: int) -> bool:
        """Whether a re-attach of ``consumer`` that failed with ``exc`` declares its queue again: a 404 for a queue of
        this Broker's that the declare just before found there, its deletion not over (RabbitMQ 4.0.5 cancels a
        quorum queue's consumers while the queue still answers a declare); ``times`` so far, up to
        :data:`DELETED_AGAIN`."""
        if consumer.queue not in self._queues or not not_found_saying(exc, "no queue") or times >= DELETED_AGAIN:
            return False
        log.debug("consumer %s: %s was being deleted as it was declared again (%s); declared again",
                  consumer.consumer_tag, self._shown(consumer), exc)  # fmt: skip
        return True

    async def _attach_again(self, consumer: Consumer, *, redeclare: bool) -> None:
        await self._ready()
        self._raise_if_gone(consumer.queue)
        if redeclare and consumer.queue in self._queues:
            await self._declare_with_bindings(consumer.queue)
        await self._attach(consumer)

    async def _detach(self, consumer: Consumer, *, grace: float) -> None:
        if consumer.cancelled:
            return
        consumer.cancelled = True
        self._consumers.pop(consumer.consumer_tag, None)
        if consumer._owns_queue:
            # Gone from the broker with its consumer, or soon: declared again by every reconnect, such a queue
            # came back for nobody (300 consume-and-cancel cycles: 300 queues more at each reconnect, in a hunt).
            # Forgotten with the last consumer of it.
            others = [c for c in self._consumers.values() if c.queue == consumer.queue]
            for other in others:
                other._owns_queue = True
            if not others:
                self.forget(consumer.queue)
        channel, consumer._channel = consumer._channel, None
        consumer.attached.clear()
        # The rest in a task of its own, which this stop, if cancelled (given less time than its grace, a timeout
        # around an exit), stops waiting for but does not cut short. Cut short during the grace, the channel, no
        # one's any more, was left open for the connection's life (10 of 10 such stops, in a hunt); closed at
        # once instead, it gave the running handlers' messages back to the queue to run again beside them.
        own = asyncio.current_task()  # a callback's own stop does not wait for itself
        await asyncio.shield(self._spawn(self._stop_on(consumer, channel, own, grace)))
        if consumer.lost_in_flight:
            n = consumer.lost_in_flight
            log.warning("consumer %s on %s stopped; %d message%s in flight %s lost with the connection or channel "
                        "while it ran (the broker delivers %s again)", consumer.consumer_tag, consumer.queue.name,
                        n, "s" if n != 1 else "", "were" if n != 1 else "was", "them" if n != 1 else "it")  # fmt: skip
        elif not self.is_connected:
            log.info("consumer %s on %s stopped while the connection was down", consumer.consumer_tag,
                     consumer.queue.name)  # fmt: skip

    async def _stop_on(
        self, consumer: Consumer, channel: AbstractChannel | None, own: asyncio.Task[Any] | None, grace: float
    ) -> None:
        """What :meth:`_detach` does on the consumer's ``channel``: cancel the consumer, give its running callbacks
        (but ``own``, the stop's caller) ``grace`` seconds, cancel what still runs, close the channel (which
        returns whatever is still unacked to the queue).

        The callbacks waited for are those running at the stop and those of the deliveries the broker sent before
        its answer to the basic.cancel (they start meanwhile). Before, only the first: the others ran on past the
        stop, and the ack of one sent after the channel's close made the broker close the whole connection (504
        CHANNEL_ERROR: every consumer of the Broker cut, in 3 of 8 stops under load, in a hunt). A settlement the
        close would overtake is refused (:func:`~amqpkit.channels.close_quietly`): its message goes back.

        The grace runs from the stop, while the basic.cancel is on its way. Unanswered (a connection gone silent),
        the whole ends within ``grace`` + 3 * :data:`STOP_STEP` seconds; a broker that answered it gets up to
        5 s for the close as well. Before, the answer was waited for up to 5 s first: on a connection gone
        silent a stop with a grace of 1 s cancelled its callbacks 6 s after it began."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        cancelling: asyncio.Future[Any] | None = None
        if channel is not None and not channel.is_closed:
            cancelling = asyncio.ensure_future(channel.basic_cancel(consumer.consumer_tag))

        def running() -> set[asyncio.Task[Any]]:
            return {t for t in consumer.inflight if t is not own and not t.done()}

        try:
            while (left := deadline - loop.time()) > 0:
                waits: set[asyncio.Future[Any]] = set(running())
                if cancelling is not None and not cancelling.done():
                    waits.add(cancelling)
                if not waits:
                    break
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                await asyncio.sleep(0)  # a delivery's task made meanwhile takes its first step: in inflight
            overdue = running()
            if overdue:
                # Out of grace: cancel them; their messages are nacked back to the queue
                # (a Worker does it explicitly; closing the channel does it for the rest).
                log.warning("consumer %s: %d callbacks still running after %.3g s; cancelling",
                            consumer.consumer_tag, len(overdue), grace)  # fmt: skip
                for task in overdue:
                    task.cancel()
                await asyncio.wait(overdue, timeout=STOP_STEP)
            if cancelling is not None and not cancelling.done():
                await asyncio.wait({cancelling}, timeout=STOP_STEP)
        finally:
            answered = cancelling is not None and cancelling.done() and not cancelling.cancelled()
            if cancelling is not None:
                if answered:
                    cancelling.exception()  # its error, if any, is the channel's: the close below says it
                cancelling.cancel()
        if channel is not None and not channel.is_closed:
            # A connection that answered gets the usual time for the close too (cut short, the close is sent again)
            await close_quietly(channel, timeout=5.0 if answered else STOP_STEP)

    def _wait_for_channel(self, consumer: Consumer, exc: ChannelLimitReached) -> None:
        """A limit on channels leaves ``consumer`` unattached: it stays registered, and is asked for again."""
        if consumer.waiting_for_channel is None:
            log.error("consumer %s on %s is not attached: %s; its channel is asked for again later "
                      "(Broker.detached_consumers() lists it meanwhile)", consumer.consumer_tag, self._shown(consumer),
                      exc)  # fmt: skip
        consumer.waiting_for_channel = exc
        if consumer._access_refusal is not None:  # allowed now, but no room
            consumer._access_refusal = None
            consumer.error = None
        if self._waiting_task is None or self._waiting_task.done():
            self._waiting_task = self._spawn(self._attach_waiting())

    async def _attach_waiting(self) -> None:
        """Ask again for the channels of the consumers a limit left waiting, in the order they came, until none
        waits: when a limit learned from the broker runs out (one ask then), else every few seconds (a limit
        known here costs nothing to check)."""
        while True:
            waiting = [c for c in self._consumers.values() if c.waiting_for_channel is not None and not c.cancelled]
            if not waiting or self._closing:
                return
            loop = asyncio.get_running_loop()
            await asyncio.sleep(max(self._channel_cap_until - loop.time() + 0.05, WAITING_CHECK))
            for consumer in waiting:
                try:
                    await self._ready()
                    await self._attach(consumer)
                except ChannelLimitReached as exc:
                    consumer.waiting_for_channel = exc  # still no room: the rest wait with it
                    break
                except ConnectionLost:
                    break  # the reconnect attaches what fits, and leaves the rest waiting
                except TopologyError as exc:
                    if self._waits_out(consumer.queue, exc):
                        self._wait_for_access(consumer, exc)
                    else:
                        self._stop_consumer(consumer, exc)
                except Exception as exc:
                    self._stop_consumer(consumer, exc)

    def _wait_for_access(self, consumer: Consumer, exc: TopologyError) -> None:
        """The broker refused ``consumer`` access (403, which an operator may lift), or cannot serve its queue yet
        (see ``TopologyRegistry._waits_out``): it stays registered and not attached, ``error`` says why, and it is
        tried again in the background until the broker allows it. Said once per refusal (again only when the
        broker's words change), not at each attempt."""
        if not same_refusal(consumer._access_refusal, exc):
            # a named exclusive queue another connection holds (405) is said once, for the queue (_say_locked)
            level = logging.ERROR
            if self._locked(consumer.queue, exc):
                level = logging.DEBUG
            elif queue_unavailable(exc):
                level = logging.WARNING  # most often a node just started: over in seconds
            log.log(level,
                    "consumer %s on %s is not attached: %s; it is tried again until the broker allows it "
                    "(Broker.detached_consumers() lists it meanwhile)", consumer.consumer_tag, self._shown(consumer),
                    exc)  # fmt: skip
        consumer._access_refusal = exc
        consumer.error = exc
        consumer.waiting_for_channel = None
        consumer.attached.clear()
        consumer._channel = None
        self._retry_refused_soon()

    def _retry_refused_soon(self) -> None:
        if self._access_task is None or self._access_task.done():
            self._access_task = self._spawn(self._retry_refused())

    async def _retry_refused(self) -> None:
        """Declare again what the broker refused access to (see :meth:`_wait_for_access` and
        ``TopologyRegistry._keep_refused``), and attach again the consumers refused so, with the reconnect
        policy's backoff, until none is left. While the connection is down the reconnect does it."""
        attempt = 0
        while True:
            waiting = [c for c in self._consumers.values() if c._access_refusal is not None and not c.cancelled]
            for spec in [s for s in self._access_refused if not self.remembers(s)]:
                del self._access_refused[spec]  # forgotten or deleted meanwhile
            if (not waiting and not self._access_refused) or self._closing:
                return
            await asyncio.sleep(self._retry_delay(attempt))
            attempt += 1
            if not self.is_connected:
                await self._connected.wait()
                continue  # the reconnect declared everything again and attached what it could: look again
            try:
                declared, held = await self._declare_refused()
                for consumer in waiting:
                    if consumer.cancelled or consumer._access_refusal is None:
                        continue
                    try:
                        await self._reattach_refused(consumer, declared, held)
                    except TopologyError as exc:
                        if self._waits_out(consumer.queue, exc):
                            self._wait_for_access(consumer, exc)  # still refused: said again only if it differs
                        else:
                            self._stop_consumer(consumer, exc)
                    except ChannelLimitReached as exc:
                        self._wait_for_channel(consumer, exc)
                    except ConnectionLost:
                        raise
                    except Exception as exc:
                        self._stop_consumer(consumer, exc)
            except (ConnectionLost, ChannelLimitReached):
                continue  # the reconnect declares and attaches them; or a channel for the declares, later
            except Exception:
                log.exception("declaring again what the broker refused access to failed; tried again later")

    async def _declare_refused(self) -> tuple[set[Queue], set[str]]:
        """Declare the specs refused access, exchanges first, then queues, then bindings (a declared queue's own
        too); what is still refused stays, what is refused otherwise now is forgotten and reported, each spec for
        its own error (a bind's is not its queue's). A binding whose exchange is still refused is not tried. The
        queues declared, and the names of the exchanges still waiting (for :meth:`_reattach_refused`, once a round:
        every exchange left in ``_access_refused``, also one no longer remembered, which the next round drops)."""
        pending = self._access_refused

        async def again(spec: Exchange | Queue | Binding) -> bool:
            try:
                await self._declare_spec_on(spec)
            except TopologyError as exc:
                if self._waits_out(spec, exc):
                    self._keep_refused(spec, exc)
                else:
                    pending.pop(spec, None)
                    self._forget_refused(spec, exc)
                return False
            if pending.pop(spec, None) is not None:
                log.info("declared %s again: the broker allows it again", _describe(spec))
            return True

        held: dict[str, TopologyError] = {}
        for exchange in [s for s in pending if isinstance(s, Exchange)]:
            if self.remembers(exchange) and not await again(exchange) and exchange in pending:
                held[exchange.name] = pending[exchange]  # still refused
        declared: set[Queue] = set()
        await self._streams_gone([s for s in pending if isinstance(s, Queue) and self.remembers(s)], why="meanwhile")
        for queue in [s for s in pending if isinstance(s, Queue)]:
            if self.remembers(queue) and await again(queue):
                declared.add(queue)
        # its bindings were left out with a queue refused at the reconnect
        bindings = [s for s in pending if isinstance(s, Binding)]
        bindings += [b for b in self._bindings if b.queue in declared and b not in pending]
        for binding in bindings:
            if not self.remembers(binding) or (binding.queue in pending and binding.queue not in declared):
                continue  # forgotten meanwhile, or goes with its queue
            if binding.exchange.name in held:
                pending[binding] = held[binding.exchange.name]  # waits with its exchange
                continue
            await again(binding)
        return declared, {s.name for s in pending if isinstance(s, Exchange)}

    async def _reattach_refused(self, consumer: Consumer, declared: set[Queue], held: set[str]) -> None:
        """Declare ``consumer``'s queue and bindings again (ours to declare, and not just declared), then attach;
        not while its queue, one of its bindings or their exchange (named in ``held``) is still refused (it waits
        with them)."""
        queue = consumer.queue
        pending = self._access_refused
        if queue in pending or any(b in pending or b.exchange.name in held for b in self._bindings if b.queue == queue):
            return
        self._raise_if_gone(queue)
        if queue in self._queues and queue not in declared:
            await self._declare_with_bindings(queue)
        await self._attach(consumer)

    def _raise_if_gone(self, queue: Queue) -> None:
        """A consumer's server-named queue this Broker no longer remembers (forgotten, or never declared by it)
        cannot be made again for it: a re-attach fails with a TopologyError."""
        if queue.server_named and queue not in self._queues:
            raise TopologyError("its server-named queue is gone and was not ours to declare", kind="queue")

    def _consumers_detached(self) -> None:
        """The connection is gone: no consumer is attached until the reconnect attaches it again."""
        for consumer in self._consumers.values():
            consumer.attached.clear()
            consumer._channel = None

    def _shown(self, consumer: Consumer) -> str:
        """A consumer's queue as a log line names it (a server-named queue by its live name)."""
        name = consumer.queue.name or self._queues.get(consumer.queue, "") or consumer._attached_to or ""
        return repr(name) if name else "(a server-named queue)"

    async def _exchange_changed(self, exchange: Exchange, exc: TopologyError) -> set[Queue]:
        queues = await super()._exchange_changed(exchange, exc)
        for consumer in [c for c in self._consumers.values() if c.queue in queues and not c.cancelled]:
            # attached: cancelled on the broker and its channel closed (its handlers get their grace), then
            # stopped with the error for its owner
            await self._detach(consumer, grace=consumer.grace)
            self._stop_consumer(consumer, exc)
        return queues

    def _stop_consumer(self, consumer: Consumer, exc: BaseException) -> None:
        """The consumer cannot be attached again: it stops, and its owner hears why. Its queue deleted by this
        Broker's delete_queue(), it says so, at INFO: that deletion was asked for."""
        level = logging.ERROR
        if consumer._deleted_here:
            exc, level = _deleted_here(consumer._attached_to or consumer.queue.name), logging.INFO
        log.log(level, "consumer %s on %s stopped: %s", consumer.consumer_tag, self._shown(consumer), exc)
        self._consumers.pop(consumer.consumer_tag, None)
        consumer.cancelled = True
        consumer.error = exc
        consumer.attached.clear()
        consumer._channel = None
        if consumer.on_error is not None:
            try:
                consumer.on_error(exc)
            except Exception:
                log.exception("on_error of consumer %s failed", consumer.consumer_tag)


def _deleted_here(name: str) -> TopologyError:
    """What stops a consumer whose queue this Broker's delete_queue() deleted."""
    return TopologyError(f"queue {name!r} was deleted by this Broker's delete_queue()", kind="queue", name=name)


def _deleted(name: str) -> TopologyError:
    """What stops a consumer whose queue, not this Broker's to declare, a passive declare found deleted after the
    broker cancelled it: the broker's 404 as a basic.consume would have had it, as its cause."""
    text = f"NOT_FOUND - no queue {name!r}"
    error = TopologyError(f"queue {name!r}: {text} (the broker cancelled its consumer)", kind="queue", name=name)
    error.__cause__ = ChannelNotFoundEntity(text)
    return error
