"""The serving side of RPC: :class:`RpcServer` runs typed methods from a request queue.

See :mod:`amqpkit.patterns.rpc` for the conventions and :mod:`amqpkit.patterns.rpc_wire` for what travels.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Self, TypeVar

from pamqp.commands import Basic

from .. import _hooks
from .._handlers import HandlerInfo, checked_concurrency, inspect_handler
from ..codec import Codec, codec_for
from ..connection import Broker, Consumer
from ..errors import DecodeError, brief
from ..executors import ExecutorKind
from ..message import Delivery, Settlement
from ..topology import Queue
from ..unreadable import refusal
from ._starts import Starts
from .long_tasks import HandlerTimeouts
from .pubsub import consumed_elsewhere
from .rpc_wire import DEFAULT_CONCURRENCY, ERROR_CONTENT_TYPE, TIMEOUT_HEADER, error_body, safe_reply_to

__all__ = ["RpcServer"]

log = logging.getLogger("amqpkit.rpc")

F = TypeVar("F", bound=Callable[..., Any])


class RpcServer:
    """Serves methods from a request queue.

    ::

        server = RpcServer(broker, "billing.rpc")

        @server.method("charge")
        async def charge(req: Charge) -> Receipt: ...

        async with server:
            await stop.wait()

    The method is named by the request's ``type``; a server with one method
    also serves requests with no ``type``. ``concurrency`` requests run at
    once; several servers may consume the same queue.

    A queue given by name is declared as a durable classic queue (transient
    non-exclusive queues are deprecated on RabbitMQ 4.x); pass a
    :class:`~amqpkit.Queue` to declare it otherwise. A queue that already
    exists as a transient one (declared by an earlier amqpkit, or by the
    official tutorial) must be deleted once, or given as
    ``Queue(name, durable=False)``, since RabbitMQ refuses to redeclare it.

    If the request queue cannot be attached again after a reconnect (deleted
    and not ours to declare, or re-declared by someone else with other
    arguments), the server stops and says why: ``on_error`` is called with
    the error, :attr:`error` holds it and :meth:`wait_stopped` returns. It
    never sits idle in silence.
    """

    def __init__(
        self,
        broker: Broker,
        queue: Queue | str = "rpc_queue",
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        handlers: Mapping[str, Callable[..., Any]] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.broker = broker
        # A name alone: a durable classic queue, shared by competing servers. Requests carry their own
        # expiration, so nothing piles up in it; a transient non-exclusive queue is deprecated on RabbitMQ 4.x.
        self.queue = Queue(queue) if isinstance(queue, str) else queue
        self.concurrency = checked_concurrency(concurrency, "an RpcServer's")
        self.on_error = on_error
        self.error: BaseException | None = None
        self._stopped = asyncio.Event()
        self._starts = Starts()  # start() and stop() take turns; a stop ends a start under way
        self._methods: dict[str, tuple[HandlerInfo, Codec[Any]]] = {}
        for name, fn in (handlers or {}).items():
            self.add(name, fn)
        self._consumer: Consumer | None = None
        self.served = 0
        self.failed = 0
        self.rejected = 0
        # the copy of a request held past the broker's consumer_timeout is answered with that, not run again
        self._timeouts = HandlerTimeouts(broker, lambda: self.queue.name, "request", self._refuse_held, log)
        self.expired = 0

    def add(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        codec: Codec[Any] | None = None,
        reply_codec: Codec[Any] | None = None,
        executor: ExecutorKind | None = None,
        processes: int | None = None,
    ) -> None:
        """Serve ``fn`` as method ``name``. Codecs come from its annotations unless given.

        A plain ``def`` runs in a pool of ``concurrency`` threads; ``executor="process"`` runs a
        module-level function in ``processes`` pool processes, for CPU-bound methods (the request's
        value goes in, the reply comes back; see :mod:`amqpkit.executors`).
        """
        info = inspect_handler(fn, codec, concurrency=self.concurrency, executor=executor, processes=processes)
        if reply_codec is None:
            reply_codec = codec_for(info.returns) if info.returns not in (Any, None, type(None)) else info.codec
        self._methods[name] = (info, reply_codec)

    def method(
        self, name: str | None = None, *, executor: ExecutorKind | None = None, processes: int | None = None
    ) -> Callable[[F], F]:
        """Decorator form of :meth:`add`; the name defaults to the function's name."""

        def register(fn: F) -> F:
            self.add(name or fn.__name__, fn, executor=executor, processes=processes)
            return fn

        return register

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Declare the request queue and take requests.

        A stop() called meanwhile ends the start (its declare may wait for a broker that reads nothing from this
        connection during an alarm): start() then returns with the server stopped.
        """
        if not self._methods:
            raise ValueError("an RpcServer needs at least one method")
        await self._starts.start(self._start)

    async def _start(self) -> None:
        if self._consumer is None:
            await self.broker.declare_queue(self.queue)
            self.error = None
            self._stopped.clear()
            try:
                self._consumer = await self.broker.consume(
                    self.queue, self._timeouts.wrap(self._on_request), prefetch=self.concurrency, on_error=self._failed
                )
            except BaseException:
                # Not started: undone, so that a reconnect does not declare the request queue again for a
                # server that is not there. The queue itself, a named one others may serve, stays (as at stop()).
                if not consumed_elsewhere(self.broker, self.queue):
                    self.broker.forget(self.queue)
                raise

    @property
    def running(self) -> bool:
        """Taking requests now (started, and neither stopped nor failed)."""
        return self._consumer is not None

    def _failed(self, exc: BaseException) -> None:
        """The request queue could not be attached again: the server stops, and says so."""
        log.error("RPC server on %s stopped: %s", self.queue.name, exc)
        self.error = exc
        self._consumer = None
        if not consumed_elsewhere(self.broker, self.queue):
            self.broker.forget(self.queue)
        self._stopped.set()
        if self.on_error is not None:
            self.on_error(exc)

    async def wait_stopped(self) -> None:
        """Return once the server has stopped: by :meth:`stop`, or failed (then :attr:`error` says why)."""
        await self._stopped.wait()

    async def stop(self, *, grace: float = 5.0) -> None:
        """Stop taking requests; running ones get ``grace`` seconds.

        The Broker forgets the request queue (unless another consumer on it
        still reads it), so a reconnect does not declare it again: a request
        sent while no server runs is returned (``NoResponder``) instead of
        waiting in a queue nobody reads.
        """
        self._starts.overtake()
        async with self._starts.turn:
            consumer, self._consumer = self._consumer, None
            if consumer is not None:
                await consumer.cancel(grace=grace)
                for info, _ in self._methods.values():
                    info.close()
            if not consumed_elsewhere(self.broker, self.queue):
                self.broker.forget(self.queue)
            self._stopped.set()

    def _lookup(self, method: str | None) -> tuple[HandlerInfo, Codec[Any]] | None:
        if method:
            return self._methods.get(method)
        if len(self._methods) == 1:
            return next(iter(self._methods.values()))
        return None

    async def _refuse_undecodable(
        self, raw: Delivery[bytes], reply_to: str | None, correlation_id: str | None, exc: DecodeError
    ) -> None:
        """Reject a request that cannot be decoded, answering its caller with the DecodeError when it can."""
        self.rejected += 1
        log.error("rejected request id=%s method=%s on %s: cannot decode: %s", raw.message_id, raw.type,
                  self.queue.name, exc)  # fmt: skip
        if reply_to and correlation_id:
            await self._reply(reply_to, correlation_id, error_body("DecodeError", str(exc), {"errors": exc.errors}))
        await raw.reject(requeue=False)

    async def _refuse_held(self, raw: Delivery[bytes], why: str) -> None:
        self.failed += 1
        reply_to, correlation_id = raw.reply_to, raw.correlation_id
        if reply_to and correlation_id and safe_reply_to(reply_to):
            await self._reply(reply_to, correlation_id, error_body("ConsumerTimeoutExceeded", why))
        await raw.ack()

    async def _on_request(self, raw: Delivery[bytes]) -> None:
        reply_to, correlation_id = raw.reply_to, raw.correlation_id
        if raw.unreadable:  # first: a reply_to that could not be read is said to be that, not to be missing
            await self._refuse_undecodable(raw, reply_to, correlation_id, refusal(raw.unreadable))
            return
        if not reply_to or not correlation_id:
            missing = "reply_to" if not reply_to else "correlation_id"
            self.rejected += 1
            log.error("rejected request id=%s on %s: no %s", raw.message_id, self.queue.name, missing)
            await raw.reject(requeue=False)
            return
        if not safe_reply_to(reply_to):
            # Answered, the broker would close this Broker's whole connection (541), and the request, delivered
            # again, cut it again: 3 such requests, 3-8 reconnects on 3.10, 4-12 on 4.0, in a hunt.
            self.rejected += 1
            log.error("rejected request id=%s on %s: its reply_to %.80r is not a direct reply-to address the broker "
                      "can read (a reply to it would close this connection)", raw.message_id, self.queue.name,
                      reply_to)  # fmt: skip
            await raw.reject(requeue=False)
            return
        budget = _budget_ms(raw.headers)
        if budget is not None and budget <= 0:
            self.expired += 1
            log.info("skipped request id=%s method=%s: the caller has no time left", raw.message_id, raw.type)
            await raw.ack()
            return
        found = self._lookup(raw.type)
        if found is None:
            self.rejected += 1
            known = ", ".join(sorted(self._methods))
            log.error("rejected request id=%s: unknown method %r (serving %s)", raw.message_id, raw.type, known)
            await self._reply(
                reply_to, correlation_id, error_body("UnknownMethod", f"no method {raw.type!r}; serving {known}")
            )
            await raw.reject(requeue=False)
            return
        info, reply_codec = found
        try:
            value = info.codec.decode(raw.body, raw.content_type)
        except DecodeError as exc:
            await self._refuse_undecodable(raw, reply_to, correlation_id, exc)
            return
        try:
            # A codec that hands the body back as it is (bytes) needs no decoded copy of the delivery.
            result = await info(raw if value is raw.value else raw.with_value(value))
            body, content_type = reply_codec.encode(result), reply_codec.content_type
        except Exception as exc:
            self.failed += 1
            if _hooks.handler_failed is not None:  # amqpkit.telemetry: error.type on the SERVER span
                _hooks.handler_failed(exc)
            log.warning("method %s failed for request id=%s: %s", raw.type or "(default)", raw.message_id, brief(exc))
            details = getattr(exc, "details", None)
            body = error_body(type(exc).__name__, str(exc), details if isinstance(details, Mapping) else None)
            content_type = ERROR_CONTENT_TYPE
        if raw.settled is Settlement.REQUEUED:
            # The handler gave the request back (the inbox, its database down): it runs again and is answered
            # then. Answered now, the caller got the handler's None for a request that had not run.
            return
        await self._reply(reply_to, correlation_id, body, content_type)
        self.served += 1
        # The reply is only queued for the connection's writer. Let the writer send it before the ack is
        # built and queued: the caller's wait then does not include the ack. The ack goes out even if
        # this task is cancelled at that point, as it did when nothing came between reply and ack.
        try:
            await asyncio.sleep(0)
        finally:
            await raw.ack()

    async def _reply(
        self, reply_to: str, correlation_id: str, body: bytes, content_type: str = ERROR_CONTENT_TYPE
    ) -> None:
        """Send a reply (or, by default content type, an error document) to the request's ``reply_to``."""
        limit = self.broker.settings.max_message_size
        if len(body) > limit:
            body = error_body("MessageTooLarge", f"reply of {len(body)} bytes over {limit}")
            content_type = ERROR_CONTENT_TYPE
        # Transient without saying so (no delivery mode: a reply is never persisted). The message id is the
        # request's correlation id: one reply per request, and aiormq does not make a random one per reply.
        properties = Basic.Properties(
            content_type=content_type, correlation_id=correlation_id, message_id=correlation_id
        )
        await self.broker.lowlevel.publish_unconfirmed(body, properties, routing_key=reply_to)


def _budget_ms(headers: Mapping[str, Any]) -> float | None:
    """The caller's time left when it sent the request, in ms (its ``x-timeout-ms`` header), if it said.

    Relative, so it means the same on any clock. Absolute times a request may
    carry (an older client's ``x-deadline``, timestamp + expiration) are not
    used: read with another machine's clock they can be in the past for a
    request the caller still waits for. While the request is queued the
    broker enforces its expiration, and it delivers no request that ran out.
    """
    return _as_float(headers.get(TIMEOUT_HEADER)) if headers else None


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------- client
