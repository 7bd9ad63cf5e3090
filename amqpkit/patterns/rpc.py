"""Request/reply over AMQP: :class:`RpcServer` and :class:`RpcClient`.

A request is a message on the server's queue with ``reply_to`` and
``correlation_id``; its ``type`` names the method. The reply goes to
``reply_to`` with the same ``correlation_id``: the handler's return value
encoded with its codec, or an error document under :data:`ERROR_CONTENT_TYPE`.

Every call ends: with the result, a typed error (:class:`~amqpkit.RemoteError`,
:class:`~amqpkit.NoResponder`, :class:`~amqpkit.ConnectionLost`) or
:class:`~amqpkit.RpcTimeout` at its deadline. The request carries the time
left until then as a relative budget, stamped when it is sent: the message
expiration (the broker drops a request still queued when it runs out) and an
``x-timeout-ms`` header. No absolute time is sent or trusted, so the client's
and the server's clocks need not agree: a server with a clock ahead of the
client's does not skip requests the caller still waits for.

Replies come back over RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``)
by default: no reply queue to declare, one consumer per client channel. Its
replies are at-most-once: a reply to a client that has gone is dropped.
``reply_queue="exclusive"`` uses an exclusive server-named queue instead, as
the official tutorial does.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal, Self, TypeVar, overload

from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic
from pydantic import TypeAdapter, ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from .. import _hooks
from .._handlers import HandlerInfo, inspect_handler
from ..codec import AutoCodec, Codec, TextCodec, codec_for, encode_body
from ..connection import Broker, Consumer
from ..errors import (
    ConnectionLost,
    DecodeError,
    NoResponder,
    RemoteError,
    RpcTimeout,
    Unroutable,
    map_exceptions,
)
from ..message import Delivery, Envelope
from ..topology import Queue
from .pubsub import _consumed_elsewhere

__all__ = ["DEFAULT_RPC_TIMEOUT", "ERROR_CONTENT_TYPE", "RpcClient", "RpcServer"]

log = logging.getLogger("amqpkit.rpc")

R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

ERROR_CONTENT_TYPE = "application/vnd.amqpkit.error+json"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
TIMEOUT_HEADER = "x-timeout-ms"
DEFAULT_RPC_TIMEOUT = 30.0
DEFAULT_CONCURRENCY = 32


def _error_body(error_type: str, message: str, details: Mapping[str, Any] | None = None) -> bytes:
    doc: dict[str, Any] = {"type": error_type, "message": message}
    if details:
        doc["details"] = dict(details)
    return json.dumps({"error": doc}, default=str).encode()


def _parse_error(body: bytes) -> RemoteError:
    try:
        doc = json.loads(body)["error"]
        return RemoteError(str(doc["type"]), str(doc["message"]), doc.get("details"))
    except (ValueError, KeyError, TypeError):
        return RemoteError("UnreadableError", body[:200].decode("utf-8", "replace"))


# ---------------------------------------------------------------------- server


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
        self.concurrency = concurrency
        self.on_error = on_error
        self.error: BaseException | None = None
        self._stopped = asyncio.Event()
        self._methods: dict[str, tuple[HandlerInfo, Codec[Any]]] = {}
        for name, fn in (handlers or {}).items():
            self.add(name, fn)
        self._consumer: Consumer | None = None
        self.served = 0
        self.failed = 0
        self.rejected = 0
        self.expired = 0

    def add(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        codec: Codec[Any] | None = None,
        reply_codec: Codec[Any] | None = None,
    ) -> None:
        """Serve ``fn`` as method ``name``. Codecs come from its annotations unless given."""
        info = inspect_handler(fn, codec, concurrency=self.concurrency)  # a plain def: in a thread
        if reply_codec is None:
            reply_codec = codec_for(info.returns) if info.returns not in (Any, None, type(None)) else info.codec
        self._methods[name] = (info, reply_codec)

    def method(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator form of :meth:`add`; the name defaults to the function's name."""

        def register(fn: F) -> F:
            self.add(name or fn.__name__, fn)
            return fn

        return register

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if not self._methods:
            raise ValueError("an RpcServer needs at least one method")
        if self._consumer is None:
            await self.broker.declare_queue(self.queue)
            self.error = None
            self._stopped.clear()
            self._consumer = await self.broker.consume(
                self.queue, self._on_request, prefetch=self.concurrency, on_error=self._failed
            )

    @property
    def running(self) -> bool:
        """Taking requests now (started, and neither stopped nor failed)."""
        return self._consumer is not None

    def _failed(self, exc: BaseException) -> None:
        """The request queue could not be attached again: the server stops, and says so."""
        log.error("RPC server on %s stopped: %s", self.queue.name, exc)
        self.error = exc
        self._consumer = None
        if not _consumed_elsewhere(self.broker, self.queue):
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
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.cancel(grace=grace)
            for info, _ in self._methods.values():
                info.close()
            if not _consumed_elsewhere(self.broker, self.queue):
                self.broker.forget(self.queue)
        self._stopped.set()

    def _lookup(self, method: str | None) -> tuple[HandlerInfo, Codec[Any]] | None:
        if method:
            return self._methods.get(method)
        if len(self._methods) == 1:
            return next(iter(self._methods.values()))
        return None

    async def _on_request(self, raw: Delivery[bytes]) -> None:
        reply_to, correlation_id = raw.reply_to, raw.correlation_id
        if not reply_to or not correlation_id:
            missing = "reply_to" if not reply_to else "correlation_id"
            self.rejected += 1
            log.error("rejected request id=%s on %s: no %s", raw.message_id, self.queue.name, missing)
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
                reply_to, correlation_id, _error_body("UnknownMethod", f"no method {raw.type!r}; serving {known}")
            )
            await raw.reject(requeue=False)
            return
        info, reply_codec = found
        try:
            value = info.codec.decode(raw.body, raw.content_type)
        except DecodeError as exc:
            self.rejected += 1
            log.error("rejected request id=%s method=%s: cannot decode: %s", raw.message_id, raw.type, exc)
            await self._reply(reply_to, correlation_id, _error_body("DecodeError", str(exc), {"errors": exc.errors}))
            await raw.reject(requeue=False)
            return
        try:
            result = await info(raw.with_value(value))
            body, content_type = reply_codec.encode(result), reply_codec.content_type
        except Exception as exc:
            self.failed += 1
            if _hooks.handler_failed is not None:  # amqpkit.telemetry: error.type on the SERVER span
                _hooks.handler_failed(exc)
            log.warning(
                "method %s failed for request id=%s: %s: %s",
                raw.type or "(default)", raw.message_id, type(exc).__name__, exc,
            )  # fmt: skip
            details = getattr(exc, "details", None)
            body = _error_body(type(exc).__name__, str(exc), details if isinstance(details, Mapping) else None)
            content_type = ERROR_CONTENT_TYPE
        await self._reply(reply_to, correlation_id, body, content_type)
        self.served += 1
        await raw.ack()

    async def _reply(
        self, reply_to: str, correlation_id: str, body: bytes, content_type: str = ERROR_CONTENT_TYPE
    ) -> None:
        """Send a reply (or, by default content type, an error document) to the request's ``reply_to``."""
        limit = self.broker.settings.max_message_size
        if len(body) > limit:
            body = _error_body("MessageTooLarge", f"reply of {len(body)} bytes over {limit}")
            content_type = ERROR_CONTENT_TYPE
        properties = Basic.Properties(content_type=content_type, correlation_id=correlation_id, delivery_mode=1)
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


class RpcClient:
    """Calls methods of an :class:`RpcServer` (or any server following the tutorial's conventions).

    ::

        async with RpcClient(broker, "billing.rpc") as billing:
            receipt = await billing.call("charge", Charge(...), returns=Receipt, timeout=5)

    Many calls may be in flight at once. Each ends with its result, a typed
    error or :class:`~amqpkit.RpcTimeout`; if the connection drops, every
    pending call fails at once with :class:`~amqpkit.ConnectionLost`.
    """

    def __init__(
        self,
        broker: Broker,
        queue: str = "rpc_queue",
        *,
        exchange: str = "",
        codec: Codec[Any] | None = None,
        timeout: float = DEFAULT_RPC_TIMEOUT,
        reply_queue: Literal["direct", "exclusive"] = "direct",
    ) -> None:
        if timeout <= 0:
            raise ValueError("an RPC timeout must be positive (calls always end)")
        self.broker = broker
        self.routing_key = queue
        self.exchange = exchange
        self.codec: Codec[Any] = codec or AutoCodec()
        self.timeout = timeout
        self.reply_queue = reply_queue
        self._pending: dict[str, asyncio.Future[Delivery[bytes]]] = {}
        self._ids = itertools.count()
        self._prefix = os.urandom(6).hex()
        self._channel: AbstractChannel | None = None
        self._channel_lock = asyncio.Lock()
        self._reply_consumer: Consumer | None = None
        self._reply_spec: Queue | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._tasks: set[asyncio.Future[None]] = set()
        self._started = False
        self.dropped_replies = 0
        # Requests go out on a channel without confirms, their returns read by a hook (see
        # amqpkit.aiormq_compat); False once a start had to fall back to confirming each request.
        self.fast_returns = True

    @property
    def pending(self) -> int:
        """Calls waiting for a reply now."""
        return len(self._pending)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._unsubscribe.append(self.broker.on_disconnect(self._fail_pending))
        if self.reply_queue == "exclusive":
            self._reply_spec = Queue(exclusive=True, auto_delete=True, durable=False)
            self._reply_consumer = await self.broker.consume(
                self._reply_spec, self._on_reply_delivery, auto_ack=True, prefetch=0
            )
        else:
            await self._direct_channel()

    async def close(self) -> None:
        """Stop; calls still pending fail with ConnectionLost."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        self._fail_pending(ConnectionLost("RpcClient closed"))
        if self._reply_consumer is not None:
            await self._reply_consumer.cancel()
            self._reply_consumer = None
        if self._reply_spec is not None:
            # Not declared again after a reconnect: a new start makes a new reply queue.
            self.broker.forget(self._reply_spec)
            self._reply_spec = None
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            try:
                await asyncio.wait_for(channel.close(), 5)
            except Exception as exc:
                log.debug("closing the reply channel: %s", exc)
        self._started = False

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(f"connection lost while waiting for a reply: {exc}"))

    async def _direct_channel(self) -> AbstractChannel:
        """The channel that both publishes requests and consumes direct replies (RabbitMQ requires one channel)."""
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._channel_lock:
            channel = self._channel
            if channel is not None and not channel.is_closed:
                return channel
            # Requests go out mandatory without confirms: a returned request (no
            # queue took it) fails its call through the return hook, and the
            # broker sends no confirm frame per call.
            lowlevel = self.broker.lowlevel
            channel = await lowlevel.open_channel(confirms=False)
            self.fast_returns = lowlevel.hook_returns(channel, self._on_returned)
            if not self.fast_returns:
                log.warning("aiormq does not let returns be read without confirms: RPC requests are confirmed")
                await channel.close()
                channel = await lowlevel.open_channel(confirms=True)
            with map_exceptions(kind="queue", name=DIRECT_REPLY_TO):
                await channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
            self._channel = channel
            channel.closing.add_done_callback(lambda _: self._on_channel_closed(channel))
            return channel

    def _on_channel_closed(self, channel: AbstractChannel) -> None:
        # Replies to requests sent on a dead channel can never arrive.
        if channel is self._channel:
            self._channel = None
            self._fail_pending(ConnectionLost("the reply channel closed"))

    async def _on_reply(self, message: DeliveredMessage) -> None:
        """A reply over direct reply-to."""
        await self._on_reply_delivery(self.broker.lowlevel.delivery(message, auto_ack=True))

    async def _on_reply_delivery(self, delivery: Delivery[bytes]) -> None:
        """A reply, by either route: it completes the call with its correlation id, or is dropped and counted."""
        cid = delivery.correlation_id
        future = self._pending.pop(cid, None) if cid else None
        if future is None or future.done():
            self.dropped_replies += 1
            log.debug("dropped a reply with unknown or late correlation id %r", cid)
            return
        future.set_result(delivery)

    def _on_returned(self, message: DeliveredMessage) -> None:
        future = self._pending.pop(message.header.properties.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_exception(self._no_responder())

    def _no_responder(self) -> NoResponder:
        return NoResponder(f"no queue took the request: {self.routing_key!r} has no server")

    @overload
    async def call(
        self,
        method: str | None,
        payload: Any = ...,
        *,
        returns: type[R],
        timeout: float | None = ...,
        headers: Mapping[str, Any] | None = ...,
    ) -> R: ...

    @overload
    async def call(
        self,
        method: str | None,
        payload: Any = ...,
        *,
        returns: None = ...,
        timeout: float | None = ...,
        headers: Mapping[str, Any] | None = ...,
    ) -> Any: ...

    async def call(
        self,
        method: str | None,
        payload: Any = None,
        *,
        returns: Any = None,
        timeout: float | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Any:
        """Call ``method`` with ``payload``; returns the reply decoded as ``returns`` (a type; JSON when None).

        ``method=None`` sends no ``type`` (a single-method server, as in the tutorial).
        Raises :class:`~amqpkit.RpcTimeout`, :class:`~amqpkit.RemoteError`,
        :class:`~amqpkit.NoResponder`, :class:`~amqpkit.ConnectionLost`,
        :class:`~amqpkit.DecodeError` (a reply that does not decode).
        """
        if _hooks.rpc_call is not None and not _hooks.quiet.get():  # amqpkit.telemetry: a CLIENT span, then back here
            return await _hooks.rpc_call(self, method, payload, returns, timeout, headers)
        if not self._started:
            await self.start()
        wait = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        body, content_type = encode_body(self.codec, payload)
        self.broker.check_message_size(body)
        cid = f"{self._prefix}.{next(self._ids)}"
        future: asyncio.Future[Delivery[bytes]] = loop.create_future()
        properties = Basic.Properties(
            content_type=content_type,
            correlation_id=cid,
            message_type=method,
            headers=dict(headers) if headers else {},
            delivery_mode=1,
            message_id=cid,
        )
        self._pending[cid] = future
        try:
            async with asyncio.timeout_at(deadline):
                await self._send(body, properties, future, deadline)
                reply = await future
        except TimeoutError:
            raise RpcTimeout(f"no reply to {method or 'call'!r} on {self.routing_key!r} within {wait:g} s") from None
        finally:
            self._pending.pop(cid, None)
            _settle_unread(future)
        reply_type = reply.content_type
        if reply_type == "application/octet-stream" and returns is bytes:
            return reply.body  # the common bytes reply, without parsing its content type
        media = _media(reply_type)
        if media == ERROR_CONTENT_TYPE:
            raise _parse_error(reply.body)
        return self._decode_reply(reply, returns, reply_type, media)

    def _decode_reply(self, reply: Delivery[bytes], returns: Any, content_type: str | None, media: str) -> Any:
        """Decode by the reply's content type, then check against ``returns`` when given."""
        if media == "text/plain" or (not media and returns in (str, int, float)):
            text = TextCodec().decode(reply.body, content_type)
            if returns in (None, str):
                return text
            try:
                return _adapter(returns).validate_strings(text)
            except ValidationError as exc:
                raise DecodeError(f"reply {text[:60]!r} is not a {returns!r}", errors=list(exc.errors())) from exc
        if media == "application/octet-stream" or returns is bytes:
            return reply.body
        codec = self.codec if returns is None else codec_for(returns)
        return codec.decode(reply.body, content_type)

    async def _send(
        self, body: bytes, properties: Basic.Properties, future: asyncio.Future[Any], deadline: float
    ) -> None:
        if self.reply_queue == "exclusive":
            assert self._reply_spec is not None
            await self.broker.wait_connected()
            properties.reply_to = self.broker.queue_name(self._reply_spec)
            _stamp_budget(properties, deadline)
            env = Envelope.from_properties(body, properties)
            publishing = asyncio.ensure_future(
                self.broker.publish(env, exchange=self.exchange, routing_key=self.routing_key, mandatory=True)
            )
            self._tasks.add(publishing)  # held until done: a task nobody references may be collected mid-flight
            publishing.add_done_callback(self._tasks.discard)
            publishing.add_done_callback(_settle_unread)  # abandoned below: its error, if any, is read there
            try:
                await asyncio.wait({publishing, future}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # A call that ended meanwhile (connection lost, timed out, cancelled) abandons its
                # request: it must not be published again after a reconnect, for nobody.
                if not publishing.done():
                    publishing.cancel()
            if not publishing.done() or publishing.cancelled():
                return  # the call's future has its outcome (a cancelled task is done only once it ran)
            try:
                publishing.result()
            except Unroutable as exc:
                raise self._no_responder() from exc
            return
        if not self.broker.is_connected:
            await self.broker.wait_connected()
            if future.done():
                return  # failed while it waited (the connection it was started on is gone): nothing to send
        channel = self._channel
        if channel is None or channel.is_closed:
            channel = await self._direct_channel()
        properties.reply_to = DIRECT_REPLY_TO
        _stamp_budget(properties, deadline)
        try:
            await self.broker.lowlevel.publish_nowait(
                channel, body, exchange=self.exchange, routing_key=self.routing_key, properties=properties,
                mandatory=True,
            )  # fmt: skip
        except Exception:
            # Translated here, off the hot path: a context manager entered on every call costs.
            try:
                with map_exceptions(kind="exchange", name=self.exchange):
                    raise
            except Unroutable as exc:
                raise self._no_responder() from exc

    async def call_with_retry(
        self,
        method: str | None,
        payload: Any = None,
        *,
        returns: Any = None,
        timeout: float | None = None,
        attempts: int = 3,
        retry_on: tuple[type[BaseException], ...] = (RpcTimeout, ConnectionLost, NoResponder),
    ) -> Any:
        """:meth:`call`, retried with backoff on ``retry_on``.

        Only for idempotent methods: a retried call may run twice. Never the default.
        """
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.1, max=2),
            retry=retry_if_exception_type(retry_on),
            reraise=True,
        ):
            with attempt:
                return await self.call(method, payload, returns=returns, timeout=timeout)
        raise AssertionError("unreachable")  # pragma: no cover


def _settle_unread(future: asyncio.Future[Any]) -> None:
    """Read the outcome of a call's future (or of its abandoned publish) that the call itself did not await.

    A disconnect fails every pending call's future, while the call may be
    ending another way (its deadline, a failed send): the error is known, and
    asyncio must not report it as never retrieved.
    """
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()


def _stamp_budget(properties: Basic.Properties, deadline: float) -> None:
    """Write the time left until ``deadline`` (loop time) into the request, just before it is sent."""
    left_ms = max(1, int((deadline - asyncio.get_running_loop().time()) * 1000))
    properties.expiration = str(left_ms)
    if properties.headers is None:
        properties.headers = {TIMEOUT_HEADER: left_ms}
    else:
        properties.headers[TIMEOUT_HEADER] = left_ms  # the request's own dict, made by call()


@functools.lru_cache(maxsize=256)
def _adapter(type_: Any) -> TypeAdapter[Any]:
    return TypeAdapter(type_)


def _media(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()
