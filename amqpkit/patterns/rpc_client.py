"""The calling side of RPC: :class:`RpcClient`, whose every call ends (result, typed error or timeout).

See :mod:`amqpkit.patterns.rpc` for the conventions and :mod:`amqpkit.patterns.rpc_wire` for what travels.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal, Self, TypeVar, overload

from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic
from pydantic import TypeAdapter, ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from .. import _hooks
from ..channels import close_quietly
from ..codec import AutoCodec, Codec, TextCodec, codec_for, encode_body
from ..connection import Broker, Consumer
from ..errors import (
    ConnectionLost,
    DecodeError,
    MessageTooLarge,
    NoResponder,
    PublishError,
    RpcTimeout,
    TopologyError,
    Unroutable,
    broker_size_limit,
    map_exceptions,
    publish_refused_for,
    refusal_is_for,
    refused_error,
)
from ..message import Delivery, Envelope, as_doubles, check_header_names
from ..topology import Queue
from .rpc_wire import DEFAULT_RPC_TIMEOUT, DIRECT_REPLY_TO, ERROR_CONTENT_TYPE, TIMEOUT_HEADER, parse_error

__all__ = ["RpcClient"]

# A request body over this many bytes has its size kept while it is pending (see _too_large_for_the_broker): below
# any max_message_size an operator is likely to give a broker, and above almost every request, which pays nothing
# for it. Under a lower limit, the first request over it fails as ConnectionLost instead of MessageTooLarge; once
# the limit is known, every request is checked against it.
BIG_REQUEST = 64 * 1024

log = logging.getLogger("amqpkit.rpc")

R = TypeVar("R")


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
        if not timeout > 0:  # nan too
            raise ValueError("an RPC timeout must be positive (calls always end)")
        self.broker = broker
        self._lowlevel = broker.lowlevel
        self.routing_key = queue
        self.exchange = exchange
        self.codec: Codec[Any] = codec or AutoCodec()
        self.timeout = timeout
        self.reply_queue = reply_queue
        # Each call's future, by correlation id; its result is the reply's body and content type.
        self._pending: dict[str, asyncio.Future[tuple[bytes, str | None]]] = {}
        # With an exclusive reply queue: the queue each pending call's request named for its reply.
        self._sent_to: dict[str, str] = {}
        # Over direct reply-to: the size of each pending request over BIG_REQUEST bytes, and the broker's own
        # max_message_size once a request over it closed the reply channel (with the Broker's generation).
        self._big: dict[str, int] = {}
        self._broker_limit: tuple[int, int] | None = None
        self._ids = itertools.count()
        self._prefix = os.urandom(6).hex()
        self._channel: AbstractChannel | None = None
        self._channel_lock = asyncio.Lock()
        self._reply_consumer: Consumer | None = None
        self._reply_spec: Queue | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._tasks: set[asyncio.Future[None]] = set()
        self._started = False
        self._starting: asyncio.Future[None] | None = None  # a start a first call made (see _start_by)
        self._closes = 0  # close() calls so far: a start that a close overtook undoes itself
        self.dropped_replies = 0
        # Requests go out on a channel without confirms, their returns read by a hook (see
        # amqpkit.aiormq_compat); False once a start had to fall back to confirming each request.
        self.fast_returns = True
        # Direct replies are read in the reply channel's reader (no task per reply); False when they could not be.
        self.fast_replies = False

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
        closes = self._closes
        self._unsubscribe.append(self.broker.on_disconnect(self._fail_pending))
        try:
            if self.reply_queue == "exclusive":
                self._reply_spec = Queue(exclusive=True, auto_delete=True, durable=False)
                self._reply_consumer = await self.broker.consume(
                    self._reply_spec, self._on_reply_delivery, auto_ack=True, prefetch=0,
                    on_error=self._reply_queue_lost,
                )  # fmt: skip
                self._reply_consumer._on_broker_cancel = self._reply_queue_deleted
            else:
                await self._direct_channel()
            if self._closes != closes:
                # close() ran while this start waited (a call that gave up on it, then closed the client): what
                # it made now would be left attached, its reply queue declared again by every reconnect.
                await self._shut()
        except BaseException:
            # Not started: undone, so that a later start starts (it did nothing, and calls were sent with a reply
            # queue nobody read), and the reply queue is not declared again by every reconnect, nor left behind.
            declared = ""
            if self._reply_spec is not None:
                with contextlib.suppress(TopologyError):  # not declared yet
                    declared = self.broker.queue_name(self._reply_spec)
            await self._shut()
            if declared:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.broker.delete_queue(declared), 5)
            raise

    async def close(self) -> None:
        """Stop; calls still pending fail with ConnectionLost."""
        self._closes += 1
        await self._shut()

    async def _shut(self) -> None:
        """What :meth:`close` does, also when a start undoes itself (not counted as the user's close)."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        self._fail_pending(ConnectionLost("RpcClient closed"))
        # Everything is taken first: cancelled part way (a timeout landing in the exit of 'async with'), the
        # close left the reply channel open, and an exclusive reply queue with its consumer, for the connection's
        # life (20 of 20 such closes, in a hunt).
        consumer, self._reply_consumer = self._reply_consumer, None
        spec, self._reply_spec = self._reply_spec, None
        channel, self._channel = self._channel, None
        try:
            if consumer is not None:
                await consumer.cancel()  # closes its channel, also when cancelled (Consuming._detach)
        finally:
            self._started = False  # only now: a call made while it closes fails, rather than starting it again
            if spec is not None:
                # Not declared again after a reconnect: a new start makes a new reply queue.
                self.broker.forget(spec)
            closing = None
            if channel is not None and not channel.is_closed:
                # In a task of its own, which a cancelled close does not cut short (a close cancelled after its
                # first frame makes aiormq send a second one).
                closing = asyncio.ensure_future(close_quietly(channel))
                self._tasks.add(closing)
                closing.add_done_callback(self._tasks.discard)
        if closing is not None:
            await asyncio.shield(closing)

    def _reply_queue_lost(self, exc: BaseException) -> None:
        """The exclusive reply queue could not come back after a reconnect (the broker refused it: a vhost's
        ``max-queues``, a permission): the client is stopped, and its next call starts it again with a new one.

        Before, every later call failed at once with "used before it was declared", for good, even once the
        broker would take a reply queue again.
        """
        log.warning("the reply queue of the RPC client for %r could not be declared again (%s); the next call "
                    "makes a new one", self.routing_key, exc)  # fmt: skip
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        self._reply_consumer = None
        if self._reply_spec is not None:
            self.broker.forget(self._reply_spec)
            self._reply_spec = None
        self._fail_pending(exc)
        self._started = False

    def _reply_queue_deleted(self) -> None:
        """The broker cancelled the reply consumer: the exclusive reply queue was deleted (by an operator, say;
        nothing else cancels a consumer of an exclusive queue), and the Broker declares a new one. Replies to the
        requests that named the old one are dropped by the broker: those calls fail now, as when the direct
        reply-to channel closes, instead of each waiting out its whole timeout (4 of 4 calls, 10 s, in a hunt).
        Calls sent from now on wait for the new queue (see :meth:`_send`)."""
        if self._reply_spec is None:
            return
        try:
            old = self.broker.queue_name(self._reply_spec)
        except TopologyError:
            return
        lost = [cid for cid, name in self._sent_to.items() if name == old]
        error = ConnectionLost(f"the reply queue {old!r} was deleted: the reply cannot arrive")
        for cid in lost:
            del self._sent_to[cid]
            future = self._pending.pop(cid, None)
            if future is not None and not future.done():
                future.set_exception(error)

    def _reply_refused(self) -> TopologyError | None:
        """Why the exclusive reply queue is not read now, when the broker refuses it access (403, see
        :class:`~amqpkit.Consumer`: the Broker tries again until allowed); None otherwise."""
        consumer = self._reply_consumer
        if consumer is None or consumer.cancelled or consumer.attached.is_set() or consumer.error is None:
            return None
        refusal = TopologyError(f"the reply queue is refused for now: {consumer.error}", kind="queue")
        refusal.__cause__ = consumer.error
        return refusal

    def _fail_pending(self, exc: BaseException, *, as_is: bool = False) -> None:
        pending, self._pending = self._pending, {}
        self._sent_to = {}
        self._big = {}
        for future in pending.values():
            if not future.done():
                error = exc if as_is else ConnectionLost(f"connection lost while waiting for a reply: {exc}")
                future.set_exception(error)

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
            lowlevel = self._lowlevel
            channel = await lowlevel.open_channel(confirms=False)
            self.fast_returns = lowlevel.hook_returns(channel, self._on_returned)
            if not self.fast_returns:
                log.warning("aiormq does not let returns be read without confirms: RPC requests are confirmed")
                await channel.close()
                channel = await lowlevel.open_channel(confirms=True)
            with map_exceptions(kind="queue", name=DIRECT_REPLY_TO):
                ok = await channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
            # A reply only completes a future: read it in the channel's reader, without a task per reply.
            tag = ok.consumer_tag
            self.fast_replies = tag is not None and lowlevel.hook_deliveries(channel, tag, self._on_reply_frame)
            self._channel = channel
            channel.closing.add_done_callback(lambda _: self._on_channel_closed(channel))
            return channel

    def _on_channel_closed(self, channel: AbstractChannel) -> None:
        # Replies to requests sent on a dead channel can never arrive.
        if channel is not self._channel:
            return
        self._channel = None
        closing = channel.closing
        why = closing.exception() if closing.done() and not closing.cancelled() else None
        limit = broker_size_limit(why) if why is not None else None
        if limit is not None:
            self._too_large_for_the_broker(limit, why)
        refused = publish_refused_for(why) if why is not None else None
        if refused is not None and refusal_is_for(refused, self.exchange, self.routing_key) is not False:
            # The broker closed it over a request of this client's, which all go to the same place: refused alike.
            # Before, they failed as ConnectionLost, without the broker's reason (and call_with_retry retried).
            error = PublishError(f"request refused: {why}")
            error.__cause__ = why
            self._fail_pending(error, as_is=True)
            return
        self._fail_pending(ConnectionLost(f"the reply channel closed: {why or 'closed'}"), as_is=True)

    def _too_large_for_the_broker(self, limit: int, why: BaseException | None) -> None:
        """A request over the broker's own ``max_message_size`` (lower than amqpkit's) closed the reply channel,
        which direct reply-to shares between requests and replies: that call fails with MessageTooLarge, the
        others pending with it lose their replies (ConnectionLost, below), and the limit is kept, so that a later
        request over it is refused before it is sent (until the next reconnect: the broker may be given another)."""
        self._broker_limit = (self.broker.generation, limit)
        for cid, size in list(self._big.items()):
            future = self._pending.get(cid)
            if size > limit and future is not None and not future.done():
                error = MessageTooLarge(size, limit, by_broker=True)
                error.__cause__ = why
                future.set_exception(error)

    def _check_broker_limit(self, size: int) -> None:
        known = self._broker_limit
        if known is not None and known[0] == self.broker.generation and size > known[1]:
            raise MessageTooLarge(size, known[1], by_broker=True)

    async def _on_reply(self, message: DeliveredMessage) -> None:
        """A reply over direct reply-to, in a task of aiormq's (when :meth:`_on_reply_frame` could not be hooked)."""
        self._on_reply_frame(message)

    def _on_reply_frame(self, message: DeliveredMessage) -> None:
        """A reply over direct reply-to, read from the frame as it came (it is auto-acked: no Delivery needed)."""
        properties = message.header.properties
        self._complete(properties.correlation_id, message.body, properties.content_type)

    async def _on_reply_delivery(self, delivery: Delivery[bytes]) -> None:
        """A reply over the exclusive reply queue."""
        self._complete(delivery.correlation_id, delivery.body, delivery.content_type)

    def _complete(self, cid: str | None, body: bytes, content_type: str | None) -> None:
        """A reply, by either route: it completes the call with its correlation id, or is dropped and counted."""
        future = self._pending.pop(cid, None) if cid else None
        if future is None or future.done():
            self.dropped_replies += 1
            log.debug("dropped a reply with unknown or late correlation id %r", cid)
            return
        future.set_result((body, content_type))

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
        :class:`~amqpkit.DecodeError` (a reply that does not decode),
        :class:`~amqpkit.PublishError` (the broker refused the request: a
        permission on its exchange or routing key); ValueError for a
        ``timeout`` that is not positive.
        """
        if timeout is not None and not timeout > 0:  # nan too
            raise ValueError(f"an RPC timeout must be positive (calls always end); got {timeout}")
        if _hooks.rpc_call is not None and not _hooks.quiet.get():  # amqpkit.telemetry: a CLIENT span, then _call
            return await _hooks.rpc_call(self, method, payload, returns, timeout, headers)
        return await self._call(method, payload, returns, timeout, dict(headers) if headers else {})

    async def _call(
        self, method: str | None, payload: Any, returns: Any, timeout: float | None, headers: dict[str, Any]
    ) -> Any:
        """:meth:`call` below the instrumentation hook; ``headers`` is the request's own dict (not copied again).

        The telemetry hook calls here with its trace headers added, so a subclass's own ``call`` runs once per
        call, instrumented or not.
        """
        if headers:
            check_header_names(headers)  # a name pamqp would cut short: refused before anything is sent
            headers = as_doubles(headers)
        wait = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        if not self._started or (self._starting is not None and not self._starting.done()):
            closes = self._closes
            await self._start_by(deadline, method, wait)
            if self._closes != closes:  # closed while this call waited for the start (which then undid itself)
                raise ConnectionLost("RpcClient closed while the call waited for it to start")
            if not self._started:  # a start undone by a close made before this call: this call starts it again
                await self._start_by(deadline, method, wait)
        body, content_type = encode_body(self.codec, payload)
        self.broker.check_message_size(body)
        if self._broker_limit is not None:  # learned from a request the broker refused (direct reply-to)
            self._check_broker_limit(len(body))
        cid = f"{self._prefix}.{next(self._ids)}"
        future: asyncio.Future[tuple[bytes, str | None]] = loop.create_future()
        # No delivery mode: transient, as a request always is (one property less to encode per call).
        properties = Basic.Properties(
            content_type=content_type,
            correlation_id=cid,
            message_type=method,
            headers=headers,
            message_id=cid,
        )
        self._pending[cid] = future
        if len(body) > BIG_REQUEST:
            self._big[cid] = len(body)
        unsent = False
        try:
            async with asyncio.timeout_at(deadline):
                if self.broker.blocked is not None:
                    # Written now, the request would wait unread in the socket and run once the broker reads
                    # again, long after this call ended: it is sent only once the connection is unblocked.
                    unsent = True
                    await self.broker.wait_unblocked()
                    unsent = False
                await self._send(body, properties, future, deadline)
                reply, reply_type = await future
        except TimeoutError:
            if not future.done() or future.cancelled():
                why = f"no reply to {method or 'call'!r} on {self.routing_key!r} within {wait:g} s"
                if unsent:
                    why += f"; not sent: the broker has blocked this connection ({self.broker.blocked})"
                refused = self.broker.access_refused
                if refused is not None:  # waited for a reconnect the broker refuses: not "no reply"
                    raise refused_error(RpcTimeout, f"{why}: {refused}") from None
                raise RpcTimeout(why) from None
            # The call's outcome was set in the loop turn the deadline fired in, before its timer ran: in time.
            error = future.exception()
            if error is not None:
                raise error from None  # a reply's error or a lost connection, not the timeout that met it
            reply, reply_type = future.result()
        finally:
            self._pending.pop(cid, None)
            self._sent_to.pop(cid, None)
            self._big.pop(cid, None)
            _settle_unread(future)
        if reply_type == "application/octet-stream" and returns is bytes:
            return reply  # the common bytes reply, without parsing its content type
        media = _media(reply_type)
        if media == ERROR_CONTENT_TYPE:
            raise parse_error(reply)
        return self._decode_reply(reply, returns, reply_type, media)

    async def _start_by(self, deadline: float, method: str | None, wait: float) -> None:
        """Start before a first call, within that call's deadline.

        The start goes on by itself past the deadline (cancelled, a channel open or a declare could leave the
        broker and aiormq disagreeing about a channel); the calls after it wait for it within their own.
        """
        starting = self._starting
        if starting is None or starting.done():
            starting = self._starting = asyncio.ensure_future(self.start())
            self._tasks.add(starting)
            starting.add_done_callback(self._tasks.discard)
            starting.add_done_callback(_settle_unread)  # a start nobody waits for any more: its error is read
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(starting)
        except TimeoutError:
            why = (
                f"no reply to {method or 'call'!r} on {self.routing_key!r} within {wait:g} s: not sent, the "
                "client was still starting"
            )
            if self.broker.blocked is not None:
                why += f" (the broker has blocked this connection: {self.broker.blocked})"
            refused = self.broker.access_refused
            if refused is not None:
                raise refused_error(RpcTimeout, f"{why}: {refused}") from None
            raise RpcTimeout(why) from None

    def _decode_reply(self, reply: bytes, returns: Any, content_type: str | None, media: str) -> Any:
        """Decode the reply's body by its content type, then check against ``returns`` when given."""
        if media == "text/plain" or (not media and returns in (str, int, float)):
            text = TextCodec().decode(reply, content_type)
            if returns in (None, str):
                return text
            try:
                return _adapter(returns).validate_strings(text)
            except ValidationError as exc:
                raise DecodeError(f"reply {text[:60]!r} is not a {returns!r}", errors=list(exc.errors())) from exc
        if media == "application/octet-stream" or returns is bytes:
            return reply
        codec = self.codec if returns is None else codec_for(returns)
        return codec.decode(reply, content_type)

    async def _exclusive_reply_to(self, future: asyncio.Future[Any]) -> str | None:
        """The name of the exclusive reply queue for a request about to be sent, once it is read; None, with the
        call's ``future`` failed, when it cannot be."""
        await self.broker.wait_connected()
        spec = self._reply_spec
        if future.done() or spec is None:
            # Failed while it waited (the reply queue could not come back: see _reply_queue_lost); the
            # call raises what its future holds.
            if not future.done():
                future.set_exception(ConnectionLost("the reply queue could not be declared again"))
            return None
        refusal = self._reply_refused()
        if refusal is not None:
            # The broker refuses the reply queue access for now (the Broker tries again): a reply would be lost.
            if not future.done():
                future.set_exception(refusal)
            return None
        consumer = self._reply_consumer
        if consumer is not None and not consumer.attached.is_set():
            # Being attached again: after its queue was deleted, or a reconnect, the name may be a new one.
            attaching = asyncio.ensure_future(consumer.attached.wait())
            try:
                await asyncio.wait({attaching, future}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                attaching.cancel()
            if future.done() or spec is not self._reply_spec:
                if not future.done():
                    future.set_exception(ConnectionLost("the reply queue could not be declared again"))
                return None
        return self.broker.queue_name(spec)

    async def _send(
        self, body: bytes, properties: Basic.Properties, future: asyncio.Future[Any], deadline: float
    ) -> None:
        if self.reply_queue == "exclusive":
            reply_to = await self._exclusive_reply_to(future)
            if reply_to is None:
                return  # the call's future holds why it was not sent
            properties.reply_to = self._sent_to[properties.correlation_id or ""] = reply_to
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
            await self._lowlevel.publish_nowait(
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
