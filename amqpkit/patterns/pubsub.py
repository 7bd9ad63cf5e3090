"""Publish/subscribe over an exchange: a :class:`Subscriber` (and :class:`Publisher`, from publisher.py).

Fanout (every subscriber gets every message), direct (by binding key), topic
(binding patterns with ``*`` and ``#``) and headers (match all / any) are the
same two classes over different exchange types.

A subscription is *private* (a server-named, exclusive, auto-delete queue:
every subscriber instance sees every message) or *shared* (a named durable
queue: instances of one service share the work, and messages wait for them
across restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Self, cast, overload

from typing_extensions import TypeVar  # with a default (PEP 696)

from .._handlers import HandlerInfo, inspect_handler
from .._streams import refuse_auto_ack
from ..codec import AutoCodec, Codec
from ..connection import Broker, Consumer
from ..consuming import MAX_PREFETCH
from ..errors import DecodeError, SettlementError, brief
from ..executors import ExecutorKind
from ..message import Delivery, Settlement
from ..topology import Binding, Exchange, ExchangeType, Queue
from ..unreadable import refusal
from ._starts import Starts
from .long_tasks import HandlerTimeouts
from .publisher import Publisher

__all__ = ["Publisher", "Subscriber"]

log = logging.getLogger("amqpkit.pubsub")

# Any when nothing says (no codec given): `Publisher(broker, x).publish(model)` needs no annotation.
T = TypeVar("T", default=Any)

DEFAULT_PREFETCH = 32


class Subscriber(Generic[T]):
    """Receives messages from an exchange, through a handler or as an async iterator.

    With a handler::

        async def on_order(order: OrderPlaced) -> None: ...
        async with Subscriber(broker, orders, on_order, binding_keys=["eu.*"]):
            ...

    The codec comes from the handler's annotation (a pydantic model, ``str``,
    ``bytes``, ``dict``) or is given. A handler that takes ``Delivery[X]``
    settles it itself; one that returns without settling has it acked. A
    handler exception nacks the message without requeue (to the dead-letter
    exchange when the queue has one); a body that does not decode is rejected.
    Both are logged in one line with the message id, and the subscriber goes on.
    A plain ``def`` handler runs in a pool of ``prefetch`` threads;
    ``executor="process"`` runs a module-level function in ``processes``
    pool processes, for CPU-bound work (see :mod:`amqpkit.executors`).

    Without a handler, iterate: ``async with sub: async for delivery in sub: ...``
    (settle each one).

    ``queue=None`` makes a private subscription; a name or a :class:`Queue`
    makes a shared one. ``headers`` (with ``match``) binds on a headers exchange.
    If the subscription cannot be re-attached (its queue deleted and not
    declarable again, or re-declared by someone else with other arguments),
    ``on_error`` is called, :attr:`error` holds the reason, iteration raises
    it and :meth:`wait_stopped` returns: it never sits idle in silence.
    ``auto_ack=True`` trades safety for speed: the broker forgets each message
    as it sends it (at-most-once), so a failure cannot dead-letter it. It
    also ignores ``prefetch`` then: a handler (or an iteration) slower than
    the messages come leaves them waiting in this process, without bound, and
    a lost connection loses all of them. Keep ``auto_ack`` for consumers that
    keep up; the default (acks) bounds them by ``prefetch``. A stream is
    read with acks only: ``auto_ack=True`` on a queue declared as a stream
    raises ValueError (RabbitMQ would close the whole connection).
    """

    @overload
    def __init__(
        self,
        broker: Broker,
        exchange: Exchange,
        handler: Callable[..., Any],
        *,
        binding_keys: Sequence[str] = ...,
        headers: Mapping[str, Any] | None = ...,
        match: str = ...,
        queue: Queue | str | None = ...,
        codec: Codec[T] | None = ...,
        prefetch: int = ...,
        dead_letter_exchange: str | None = ...,
        auto_ack: bool = ...,
        on_error: Callable[[BaseException], None] | None = ...,
        executor: ExecutorKind | None = ...,
        processes: int | None = ...,
    ) -> None: ...

    @overload
    def __init__(
        self,
        broker: Broker,
        exchange: Exchange,
        handler: None = ...,
        *,
        binding_keys: Sequence[str] = ...,
        headers: Mapping[str, Any] | None = ...,
        match: str = ...,
        queue: Queue | str | None = ...,
        codec: Codec[T] | None = ...,
        prefetch: int = ...,
        dead_letter_exchange: str | None = ...,
        auto_ack: bool = ...,
        on_error: Callable[[BaseException], None] | None = ...,
        executor: ExecutorKind | None = ...,
        processes: int | None = ...,
    ) -> None: ...

    def __init__(
        self,
        broker: Broker,
        exchange: Exchange,
        handler: Callable[..., Any] | None = None,
        *,
        binding_keys: Sequence[str] = ("",),
        headers: Mapping[str, Any] | None = None,
        match: str = "all",
        queue: Queue | str | None = None,
        codec: Codec[T] | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        dead_letter_exchange: str | None = None,
        auto_ack: bool = False,
        on_error: Callable[[BaseException], None] | None = None,
        executor: ExecutorKind | None = None,
        processes: int | None = None,
    ) -> None:
        if isinstance(binding_keys, str):
            raise TypeError("binding_keys takes a list of keys, not one string")
        if not 0 <= prefetch <= MAX_PREFETCH:  # refused here, before start() declares and binds its queue
            raise ValueError(f"prefetch must be 0 (no limit) to {MAX_PREFETCH}, the most AMQP carries; got {prefetch}")
        self.broker = broker
        self.exchange = exchange
        self.prefetch = prefetch
        self.auto_ack = auto_ack
        self.on_error = on_error
        self.error: BaseException | None = None
        # A plain def runs in a pool of `prefetch` threads; executor="process" in `processes` processes.
        if handler is None and (executor is not None or processes is not None):
            raise TypeError("executor= and processes= go with a handler (an iterated Subscriber runs nothing)")
        self._handler: HandlerInfo | None = (
            inspect_handler(handler, codec, concurrency=prefetch, executor=executor, processes=processes)
            if handler is not None
            else None
        )
        if self._handler is not None:
            self.codec: Codec[Any] = self._handler.codec
        else:
            self.codec = codec if codec is not None else AutoCodec()
        if queue is None:
            self.queue = Queue(
                exclusive=True, auto_delete=True, durable=False, dead_letter_exchange=dead_letter_exchange
            )
        elif isinstance(queue, str):
            self.queue = Queue(queue, durable=True, dead_letter_exchange=dead_letter_exchange)
        else:
            self.queue = queue
        refuse_auto_ack(self.queue, {}, auto_ack)  # before anything is declared
        if exchange.is_default:
            # The default exchange routes by queue name; there is nothing to bind.
            self.bindings: tuple[Binding, ...] = ()
        elif headers is not None or exchange.type is ExchangeType.HEADERS:
            self.bindings = (Binding(exchange, self.queue, headers=dict(headers or {}), match=match),)
        elif exchange.type is ExchangeType.FANOUT:
            self.bindings = (Binding(exchange, self.queue),)
        else:
            self.bindings = tuple(Binding(exchange, self.queue, routing_key=k) for k in dict.fromkeys(binding_keys))
        self._consumer: Consumer | None = None
        self._declared = False
        self._queue_name: str | None = None
        self._stopped = asyncio.Event()
        self._starts = Starts()  # start() and stop() take turns; a stop ends a start under way
        self._inbox: asyncio.Queue[Delivery[Any] | _Failed] | None = None
        self.handled = 0
        self.failed = 0
        self.rejected = 0
        # the copy of a message held past the broker's consumer_timeout is rejected, not handled again
        self._timeouts = HandlerTimeouts(broker, lambda: self.queue_name, "message", self._refuse_held, log)

    @property
    def private(self) -> bool:
        return self.queue.server_named

    @property
    def queue_name(self) -> str:
        """The subscription queue's name (for a private one, the name the broker gave it last)."""
        if self._queue_name is None or self.broker.remembers(self.queue):
            self._queue_name = self.broker.queue_name(self.queue)
        return self._queue_name

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def declare(self) -> None:
        """Declare exchange, queue and bindings: from here on, messages for this subscription are kept."""
        if not self.exchange.is_builtin:
            await self.broker.declare_exchange(self.exchange)
        self._queue_name = await self.broker.declare_queue(self.queue)
        for binding in self.bindings:
            await self.broker.bind(binding)
        self._declared = True

    async def start(self) -> None:
        """Declare (unless :meth:`declare` ran), then start consuming.

        A stop() called meanwhile ends the start (its declares may wait for a broker that reads nothing from this
        connection during an alarm): start() then returns with the subscription stopped.
        """
        await self._starts.start(self._start)

    async def _start(self) -> None:
        if self._consumer is not None:
            return
        try:
            if not self._declared:
                try:
                    await self.declare()
                except BaseException:
                    self._declared = True  # perhaps in part (its queue, not a binding the broker refused): undone
                    raise
            if self._handler is None:
                self._inbox = asyncio.Queue()
            self.error = None
            self._stopped.clear()
            self._consumer = await self.broker.consume(
                self.queue,
                self._timeouts.wrap(self._on_delivery),
                prefetch=self.prefetch,
                auto_ack=self.auto_ack,
                on_error=self._failed,
            )
        except BaseException:
            # Not started: undone, so that a reconnect does not declare and bind again a queue nobody reads,
            # and a private one, declared and never consumed (so never auto-deleted), is not left collecting.
            private = self.private and self.broker.remembers(self.queue)
            declared = self.broker.queue_name(self.queue) if private else ""
            self._forget()
            if declared and not consumed_elsewhere(self.broker, self.queue):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.broker.delete_queue(declared), 5)
            raise

    def _failed(self, exc: BaseException) -> None:
        """The subscription is gone for good (its queue could not be re-attached): tell the user's code."""
        self.error = exc
        self._consumer = None
        self._forget()
        self._stopped.set()
        if self.on_error is not None:
            self.on_error(exc)
        if self._inbox is not None:
            self._inbox.put_nowait(_Failed(exc))

    async def stop(self, *, grace: float = 5.0) -> None:
        """Stop consuming; running handlers get ``grace`` seconds; unsettled messages go back to the queue.

        The Broker forgets the subscription, so a reconnect does not bring it
        back: a private queue (gone with its consumer) is not declared again,
        and a shared queue is not bound again. A shared queue itself is never
        deleted: it stays bound on the broker and keeps messages for the next
        start. What another consumer on this Broker still reads is kept.
        """
        self._starts.overtake()
        async with self._starts.turn:
            consumer, self._consumer = self._consumer, None
            if consumer is not None:
                await consumer.cancel(grace=grace)
            if self._handler is not None:
                self._handler.close()
            self._forget()
            self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once the subscription has stopped: by :meth:`stop`, or failed (then :attr:`error` says why)."""
        await self._stopped.wait()

    def _forget(self) -> None:
        """Drop this subscription's queue (private) or bindings (shared) from the Broker's registry."""
        if not self._declared:
            return
        self._declared = False
        if consumed_elsewhere(self.broker, self.queue):
            return
        if self.private:
            self.broker.forget(self.queue)  # its bindings go with it
        else:
            self.broker.forget(*self.bindings)

    def __aiter__(self) -> AsyncIterator[Delivery[T]]:
        if self._handler is not None:
            raise TypeError("this Subscriber has a handler; iterate only over a Subscriber made without one")
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Delivery[T]]:
        if self._inbox is None:
            raise RuntimeError("start the Subscriber first: 'async with subscriber: async for ...'")
        while self._consumer is not None or not self._inbox.empty():
            item = await self._inbox.get()
            if isinstance(item, _Failed):
                raise item.error
            yield item

    async def _refuse_held(self, raw: Delivery[bytes], why: str) -> None:
        self.rejected += 1
        await _settle_quietly(raw.nack(requeue=False))  # to the queue's dead-letter exchange, if it has one

    async def _on_delivery(self, raw: Delivery[bytes]) -> None:
        try:
            if raw.unreadable:
                raise refusal(raw.unreadable)
            value = self.codec.decode(raw.body, raw.content_type)
        except DecodeError as exc:
            self.rejected += 1
            log.error("rejected message id=%s from %s: cannot decode: %s", raw.message_id, self.queue_name, exc)
            if raw.settled is None:
                await _settle_quietly(raw.reject(requeue=False))
            return
        # Decoded in place: the raw delivery becomes the typed one (no second object per message).
        delivery = cast("Delivery[Any]", raw)
        delivery.value = value
        if self._handler is None:
            assert self._inbox is not None
            await self._inbox.put(delivery)
            return
        try:
            await self._handler(delivery)
        except Exception as exc:
            self.failed += 1
            log.error("handler failed for message id=%s from %s: %s", raw.message_id, self.queue_name, brief(exc))
            if delivery.settled is None:
                await _settle_quietly(delivery.nack(requeue=False))
            return
        if delivery.settled is Settlement.REQUEUED:
            return  # given back by the handler (the inbox, its database down): handled when it comes again
        self.handled += 1
        if delivery.settled is None:
            await _settle_quietly(delivery.ack())


def consumed_elsewhere(broker: Broker, queue: Queue) -> bool:
    """Whether a live consumer on ``broker`` still reads ``queue`` (its topology must then stay remembered)."""
    return any(not c.cancelled and c.queue == queue for c in broker.consumers)


_consumed_elsewhere = consumed_elsewhere  # its name before other patterns shared it


class _Failed:
    """Put in the iterator's inbox when the subscription ends with an error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


async def _settle_quietly(settling: Awaitable[None]) -> None:
    """Settle, tolerating a channel that died meanwhile (the broker redelivers then)."""
    try:
        await settling
    except SettlementError:
        raise
    except Exception as exc:
        log.warning("could not settle a delivery (it will be redelivered): %s", exc)
