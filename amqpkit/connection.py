"""The Broker: one connection, kept alive, with the topology and consumers it carries.

The Broker is the one place that talks to aiormq. It

- connects with backoff (tenacity), trying every URL in order;
- after a lost connection reconnects by itself, declares again every
  exchange, queue and binding it declared, and attaches every consumer
  again (it holds them by strong reference: nothing is left to weak refs);
- publishes on one channel with publisher confirms, waiting for a
  reconnect up to the publish deadline instead of dropping the message;
- gives each consumer a channel of its own with its own prefetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Self

import aiormq
import aiormq.exceptions
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base
from yarl import URL

from . import _hooks
from .errors import (
    ConnectError,
    ConnectionLost,
    MessageTooLarge,
    PublishError,
    PublishTimeout,
    TopologyError,
    map_exceptions,
)
from .message import Delivery, Envelope
from .settings import BrokerSettings, TlsSettings, host_port, redact_url
from .topology import Binding, Exchange, Queue
from .watchdog import blocked_note, watch

__all__ = ["Broker", "Consumer", "ConsumerCallback"]

log = logging.getLogger("amqpkit.broker")

ConsumerCallback = Callable[[Delivery[bytes]], Awaitable[None]]
DisconnectCallback = Callable[[BaseException], None]
ReconnectCallback = Callable[[], Awaitable[None]]
TopologyErrorCallback = Callable[["Exchange | Queue | Binding", BaseException], None]

# Exchanges every vhost has: a publish to them never needs a check first.
_BUILTIN_EXCHANGES = frozenset(
    {"", "amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match", "amq.rabbitmq.trace"}
)


class _Connection(aiormq.Connection):
    # aiormq waits 3 * (heartbeat + 1) s before it calls a silent link dead.
    # RabbitMQ itself gives up after two missed heartbeats; so do we.
    HEARTBEAT_GRACE_MULTIPLIER = 1


class _Unreachable(Exception):
    """One failed connection attempt (internal; becomes ConnectError)."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(eq=False)
class Consumer:
    """A consumer the Broker keeps attached across reconnects until :meth:`cancel`."""

    broker: Broker
    queue: Queue
    callback: ConsumerCallback
    prefetch: int
    auto_ack: bool
    exclusive: bool
    arguments: dict[str, Any]
    consumer_tag: str = field(default_factory=lambda: f"amqpkit.{uuid.uuid4().hex[:16]}")
    channel: AbstractChannel | None = None
    cancelled: bool = False
    attached: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: set[asyncio.Task[Any]] = field(default_factory=set)
    on_error: Callable[[BaseException], None] | None = None
    error: BaseException | None = None  # why it stopped, when it could not be re-attached
    lost_in_flight: int = 0  # deliveries whose callback a lost channel or connection cut short (redelivered)
    attach_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def cancel(self, *, grace: float = 0.0) -> None:
        """Stop receiving; wait up to ``grace`` seconds for running callbacks."""
        await self.broker._detach(self, grace=grace)

    @property
    def queue_name(self) -> str:
        return self.broker.queue_name(self.queue)


class Broker:
    """A RabbitMQ connection that stays up: use as ``async with Broker(settings) as broker``."""

    def __init__(self, settings: BrokerSettings | str | None = None) -> None:
        if settings is None:
            settings = BrokerSettings.from_env()
        elif isinstance(settings, str):
            settings = BrokerSettings(url=settings)
        self.settings = settings
        self._conn: _Connection | None = None
        self._channels: dict[str, AbstractChannel] = {}
        self._channel_lock = asyncio.Lock()
        self._exchanges: dict[str, Exchange] = {}
        self._queues: dict[Queue, str] = {}
        self._bindings: dict[Binding, None] = {}
        self._consumers: dict[str, Consumer] = {}
        self._connected = asyncio.Event()
        self._closing = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._url_index = 0
        self._on_disconnect: list[DisconnectCallback] = []
        self._on_reconnect: list[ReconnectCallback] = []
        self._on_topology_error: list[TopologyErrorCallback] = []
        self._background: set[asyncio.Task[Any]] = set()
        # Exchanges a publish may use on the shared confirm channel: ours, or seen to exist on this connection.
        self._known_exchanges: set[str] = set()
        self._exchange_check_lock = asyncio.Lock()
        self._topology_lock = asyncio.Lock()
        self.generation = 0
        self.reconnects = 0
        self.republished = 0  # confirmed publishes sent again after the connection dropped mid-confirm
        self._unwatch: Callable[[], None] | None = None  # the event-loop watchdog (amqpkit.watchdog)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else ("closed" if self._closing else "disconnected")
        return f"<Broker {', '.join(self.settings.safe_urls)} {state}>"

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def server_properties(self) -> dict[str, Any]:
        """What the broker said of itself on connect (product, version, capabilities)."""
        if self._conn is None:
            return {}
        return dict(self._conn.server_properties)

    @property
    def server_product(self) -> tuple[str, str]:
        """(product, version) the broker announced, e.g. ('RabbitMQ', '3.13.7')."""
        return _product(self.server_properties)

    @property
    def server_version(self) -> tuple[int, ...]:
        """The broker's version as numbers, e.g. (4, 0, 5), as it announced on connect; () when unknown.

        For features that depend on the version: compare with a tuple (``>= (3, 12)``).
        """
        return _version(self.server_properties.get("version", ""))

    async def connect(self) -> None:
        """Connect, trying each URL in turn with backoff; :class:`ConnectError` when all fail."""
        if self._closing:
            raise ConnectError("this Broker was closed; make a new one")
        if self.is_connected:
            return
        policy = self.settings.reconnect
        failures: list[str] = []
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(policy.connect_attempts * len(self.settings.urls)),
                wait=self._wait_strategy(),
                retry=retry_if_exception(_worth_retrying),
                reraise=True,
            ):
                with attempt:
                    try:
                        await self._open()
                    except _Unreachable as exc:
                        failures.append(str(exc))
                        raise
        except _Unreachable as exc:
            targets = ", ".join(dict.fromkeys(host_port(u) for u in self.settings.urls))
            last = failures[-1] if failures else "no attempt made"
            attempts = f"{len(failures)} attempt{'s' if len(failures) != 1 else ''}"
            if exc.refused:
                raise ConnectError(
                    f"RabbitMQ refused the login after {attempts} (check user, password and vhost): {last}",
                    reason="refused",
                ) from None
            raise ConnectError(f"cannot connect to RabbitMQ at {targets} after {attempts}: {last}") from None
        if self._unwatch is None:
            self._unwatch = watch(self.settings.loop_block_threshold, self.settings.heartbeat)

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop consumers (letting running callbacks finish within ``grace``), then close."""
        if self._closing:
            return
        self._closing = True
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        consumers = list(self._consumers.values())
        if consumers:
            await asyncio.gather(*(self._detach(c, grace=grace) for c in consumers))
        background = [t for t in self._background if t is not asyncio.current_task()]
        for task in background:
            task.cancel()
        if background:
            await asyncio.wait(background, timeout=5)
        self._connected.clear()
        conn, self._conn = self._conn, None
        self._channels.clear()
        if conn is not None and not conn.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=5)
        log.info("closed connection to %s", self._current_url_safe())

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the Broker is connected (after a reconnect); ``TimeoutError`` past ``timeout``."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    def on_disconnect(self, callback: DisconnectCallback) -> Callable[[], None]:
        """Call ``callback(exc)`` each time the connection drops; returns a function that unregisters it."""
        self._on_disconnect.append(callback)
        return lambda: _discard(self._on_disconnect, callback)

    def on_reconnect(self, callback: ReconnectCallback) -> Callable[[], None]:
        """Await ``callback()`` after each reconnect, once topology and consumers are back."""
        self._on_reconnect.append(callback)
        return lambda: _discard(self._on_reconnect, callback)

    def on_topology_error(self, callback: TopologyErrorCallback) -> Callable[[], None]:
        """Call ``callback(spec, exc)`` for each exchange, queue or binding a reconnect could not restore.

        Such a spec is forgotten (the next reconnect does not try it again);
        the consumers that depended on it hear of it through their own
        ``on_error``. Returns a function that unregisters the callback.
        """
        self._on_topology_error.append(callback)
        return lambda: _discard(self._on_topology_error, callback)

    @property
    def consumers(self) -> tuple[Consumer, ...]:
        """The consumers this Broker keeps attached (a snapshot): ``attached``, ``queue_name``, ``cancel()``."""
        return tuple(self._consumers.values())

    def detached_consumers(self) -> list[str]:
        """Queue names of consumers not attached right now (e.g. while a re-attach is under way)."""
        return [c.queue.name or c.consumer_tag for c in self._consumers.values() if not c.attached.is_set()]

    @property
    def background_tasks(self) -> frozenset[asyncio.Task[Any]]:
        """Re-attaches and reconnects running in the background (held here so none is garbage-collected)."""
        tasks = set(self._background)
        if self._reconnect_task is not None and not self._reconnect_task.done():
            tasks.add(self._reconnect_task)
        return frozenset(tasks)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------ connection core

    def _wait_strategy(self) -> wait_base:
        p = self.settings.reconnect
        return wait_exponential(multiplier=p.initial_delay, max=p.max_delay, exp_base=p.multiplier) + wait_random(
            0, p.jitter
        )

    def _current_url_safe(self) -> str:
        urls = self.settings.urls
        return redact_url(urls[self._url_index % len(urls)])

    def _scrub(self, text: str) -> str:
        for url in self.settings.urls:
            password = URL(url).password
            if password:
                text = text.replace(password, "***")
        return text

    async def _open(self) -> None:
        """One attempt at the current URL; on failure move to the next and raise _Unreachable."""
        urls = self.settings.urls
        raw = urls[self._url_index % len(urls)]
        url = URL(raw)
        url = url.update_query(heartbeat=str(self.settings.heartbeat))
        context = None
        if url.scheme == "amqps":
            tls = self.settings.tls
            context = (tls or TlsSettings()).ssl_context()  # verification on, the system's CAs by default
        properties: dict[str, Any] = {}
        if self.settings.connection_name:
            properties["connection_name"] = self.settings.connection_name
        conn = _Connection(url, context=context, client_properties=properties)
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await conn.connect()
                await self._setup(conn)
        except (Exception, asyncio.CancelledError) as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=1)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._url_index += 1
            refused = isinstance(
                exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError
            )
            vhost_refused = isinstance(exc, aiormq.exceptions.InvalidFrameError) and _closed_on_open(exc)
            if isinstance(exc, TimeoutError):
                reason = f"timed out after {self.settings.connect_timeout:g} s"
            elif refused:
                reason = self._scrub(str(exc.args[0]) if exc.args else str(exc))
            elif vhost_refused:
                refused = True
                vhost = url.path[1:] or "/"
                reason = f"NOT_ALLOWED - vhost {vhost!r} does not exist or the user may not use it"
            else:
                reason = self._scrub(f"{type(exc).__name__}: {exc}")
            log.warning("connect to %s failed: %s", host_port(raw), reason)
            raise _Unreachable(f"{host_port(raw)}: {reason}", refused=refused) from None
        # A reconnect says so once, in _reconnect; the first connect says where it went.
        log.log(
            logging.INFO if self._reconnect_task is None else logging.DEBUG,
            "connected to %s (%s %s)", redact_url(raw), *_product(conn.server_properties),
        )  # fmt: skip

    async def _setup(self, conn: _Connection) -> None:
        """Make ``conn`` current: channels, topology, consumers, then mark connected.

        What the broker refuses (a queue gone that is not ours to declare, one
        re-declared with other arguments, ...) does not stop the rest: each
        refused spec is forgotten and reported, and every consumer that
        depended on it stops with the error passed to its ``on_error``. Only a
        lost connection fails the attempt (and is retried).
        """
        self._conn = conn
        self._channels.clear()
        self._known_exchanges.clear()
        self.generation += 1
        await self._channel("publish")
        refused: list[tuple[Exchange | Queue | Binding, TopologyError]] = []
        for spec in list(self._exchanges.values()):
            try:
                await self._declare_exchange_on(spec)
            except TopologyError as exc:
                refused.append((spec, exc))
        failed_queues: dict[Queue, TopologyError] = {}
        for queue in list(self._queues):
            try:
                await self._declare_queue_on(queue)
            except TopologyError as exc:
                refused.append((queue, exc))
                failed_queues[queue] = exc
        for binding in list(self._bindings):
            if binding.queue in failed_queues:
                continue  # goes with its queue
            try:
                await self._bind_on(binding)
            except TopologyError as exc:
                refused.append((binding, exc))
                failed_queues.setdefault(binding.queue, exc)
        stopped: list[tuple[Consumer, BaseException]] = []
        for consumer in list(self._consumers.values()):
            cause = failed_queues.get(consumer.queue)
            if cause is None:
                try:
                    await self._attach(consumer)
                    continue
                except TopologyError as exc:
                    cause = exc
            stopped.append((consumer, cause))
        generation = self.generation
        conn.closing.add_done_callback(lambda fut: self._on_closed(fut, generation))
        self._connected.set()
        for refused_spec, error in refused:
            self._forget_refused(refused_spec, error)
        for stopped_consumer, why in stopped:
            self._stop_consumer(stopped_consumer, why)

    def _forget_refused(self, spec: Exchange | Queue | Binding, exc: TopologyError) -> None:
        log.error("could not restore %s after the reconnect (forgotten): %s", _describe(spec), exc)
        self.forget(spec)
        for callback in list(self._on_topology_error):
            try:
                callback(spec, exc)
            except Exception:
                log.exception("topology error callback failed")

    def _shown(self, consumer: Consumer) -> str:
        """A consumer's queue as a log line names it (a server-named queue by its live name)."""
        name = consumer.queue.name or self._queues.get(consumer.queue, "")
        return repr(name) if name else "(a server-named queue)"

    def _stop_consumer(self, consumer: Consumer, exc: BaseException) -> None:
        """The consumer cannot be attached again: it stops, and its owner hears why."""
        log.error("consumer %s on %s stopped: %s", consumer.consumer_tag, self._shown(consumer), exc)
        self._consumers.pop(consumer.consumer_tag, None)
        consumer.cancelled = True
        consumer.error = exc
        consumer.attached.clear()
        consumer.channel = None
        if consumer.on_error is not None:
            try:
                consumer.on_error(exc)
            except Exception:
                log.exception("on_error of consumer %s failed", consumer.consumer_tag)

    def _on_closed(self, closing: asyncio.Future[Any], generation: int) -> None:
        if self._closing or generation != self.generation:
            return
        self._connected.clear()
        exc = closing.exception() if not closing.cancelled() else None
        reason = self._scrub(str(exc) if exc else "closed")
        # A loop blocked past the heartbeat is the usual cause: say so (see amqpkit.watchdog).
        note = blocked_note(self.settings.heartbeat)
        log.warning("connection to %s lost: %s%s; reconnecting", self._current_url_safe(), reason, note)
        lost = ConnectionLost(f"connection lost: {reason}")
        if _hooks.disconnected is not None:
            _hooks.disconnected(self)
        for consumer in self._consumers.values():
            consumer.attached.clear()
            consumer.channel = None
        for callback in list(self._on_disconnect):
            try:
                callback(lost)
            except Exception:
                log.exception("disconnect callback failed")
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        started = asyncio.get_running_loop().time()
        async for attempt in AsyncRetrying(wait=self._wait_strategy(), retry=retry_if_exception_type(_Unreachable)):
            with attempt:
                await self._open()
        self.reconnects += 1
        took = asyncio.get_running_loop().time() - started
        log.info("reconnected to %s in %.2f s", self._current_url_safe(), took)
        if _hooks.reconnected is not None:
            _hooks.reconnected(self, took)
        for callback in list(self._on_reconnect):
            try:
                await callback()
            except Exception:
                log.exception("reconnect callback failed")

    async def _channel(self, role: str, *, confirms: bool = True) -> AbstractChannel:
        """The open channel kept for ``role`` on the current connection, reopened when it died."""
        channel = self._channels.get(role)
        if channel is not None and not channel.is_closed:
            return channel
        async with self._channel_lock:
            channel = self._channels.get(role)
            if channel is not None and not channel.is_closed:
                return channel
            conn = self._conn
            if conn is None or conn.is_closed:
                raise ConnectionLost("not connected")
            with map_exceptions(kind="channel", name=role):
                channel = await conn.channel(publisher_confirms=confirms, on_return_raises=confirms)
            self._channels[role] = channel
            return channel

    async def _open_channel(self, *, confirms: bool = False, prefetch: int | None = None) -> AbstractChannel:
        """A new raw channel on the current connection, for amqpkit's patterns that manage their own.

        The caller owns it; it dies with the connection (see :meth:`on_disconnect`).
        """
        await self._connected.wait()
        conn = self._conn
        if conn is None:
            raise ConnectionLost("not connected")
        with map_exceptions(kind="channel"):
            channel = await conn.channel(publisher_confirms=confirms, on_return_raises=confirms)
            if prefetch is not None:
                await channel.basic_qos(prefetch_count=prefetch)
        return channel

    # ------------------------------------------------------------------ topology

    async def declare(self, *specs: Exchange | Queue | Binding) -> None:
        """Declare specs in the order given and remember them for reconnects."""
        for spec in specs:
            if isinstance(spec, Exchange):
                await self.declare_exchange(spec)
            elif isinstance(spec, Queue):
                await self.declare_queue(spec)
            else:
                await self.bind(spec)

    async def declare_exchange(self, exchange: Exchange) -> None:
        if exchange.is_builtin:
            return
        await self._ready()
        await self._declare_exchange_on(exchange)
        self._exchanges[exchange.name] = exchange
        self._known_exchanges.add(exchange.name)

    async def declare_queue(self, queue: Queue) -> str:
        """Declare ``queue``; returns its name (the broker's choice for a server-named queue)."""
        await self._ready()
        name = await self._declare_queue_on(queue)
        # A named queue re-declared with a different spec replaces the old one.
        self._queues.pop(queue, None)
        self._queues[queue] = name
        return name

    async def bind(self, binding: Binding) -> None:
        await self.declare_exchange(binding.exchange)
        if binding.queue not in self._queues:
            await self.declare_queue(binding.queue)
        await self._bind_on(binding)
        self._bindings[binding] = None

    async def unbind(self, binding: Binding) -> None:
        await self._ready()
        async with self._topology() as channel:
            with map_exceptions(kind="binding", name=binding.routing_key):
                await channel.queue_unbind(
                    queue=self.queue_name(binding.queue),
                    exchange=binding.exchange.name,
                    routing_key=binding.routing_key,
                    arguments=binding.bind_arguments() or None,
                )
            self._bindings.pop(binding, None)

    def forget(self, *specs: Exchange | Queue | Binding) -> None:
        """Stop remembering ``specs``: a reconnect will not declare them again. Nothing is sent to the broker.

        A forgotten queue takes its bindings with it; a forgotten exchange
        takes the bindings to it. Consumers are not touched (cancel them).
        Use it when a pattern stops using topology it declared, so that the
        next reconnect does not bring back, say, a stopped subscription's
        queue that would then collect messages nobody reads.
        """
        for spec in specs:
            if isinstance(spec, Exchange):
                if self._exchanges.get(spec.name) == spec:
                    del self._exchanges[spec.name]
                for b in [b for b in self._bindings if b.exchange.name == spec.name]:
                    del self._bindings[b]
            elif isinstance(spec, Queue):
                self._queues.pop(spec, None)
                for b in [b for b in self._bindings if b.queue == spec]:
                    del self._bindings[b]
            else:
                self._bindings.pop(spec, None)

    def remembers(self, spec: Exchange | Queue | Binding) -> bool:
        """Whether ``spec`` is declared again after a reconnect."""
        if isinstance(spec, Exchange):
            return self._exchanges.get(spec.name) == spec
        if isinstance(spec, Queue):
            return spec in self._queues
        return spec in self._bindings

    def queue_name(self, queue: Queue) -> str:
        """The live name of a declared queue."""
        if queue.server_named:
            try:
                return self._queues[queue]
            except KeyError:
                raise TopologyError("server-named queue used before it was declared", kind="queue") from None
        return queue.name

    async def delete_queue(self, queue: Queue | str, *, if_unused: bool = False, if_empty: bool = False) -> int:
        """Delete a queue and forget it (with its bindings and consumers); returns the messages it held."""
        name = queue if isinstance(queue, str) else self.queue_name(queue)
        for spec in [q for q in self._queues if self._queues[q] == name]:
            del self._queues[spec]
            for b in [b for b in self._bindings if b.queue is spec or b.queue == spec]:
                del self._bindings[b]
        await self._ready()
        async with self._topology() as channel:
            with map_exceptions(kind="queue", name=name):
                result = await channel.queue_delete(name, if_unused=if_unused, if_empty=if_empty)
            return int(result.message_count or 0)

    async def delete_exchange(self, name: str | Exchange, *, if_unused: bool = False) -> None:
        name = name if isinstance(name, str) else name.name
        self._exchanges.pop(name, None)
        self._known_exchanges.discard(name)
        for b in [b for b in self._bindings if b.exchange.name == name]:
            del self._bindings[b]
        await self._ready()
        async with self._topology() as channel:
            with map_exceptions(kind="exchange", name=name):
                await channel.exchange_delete(name, if_unused=if_unused)

    async def purge_queue(self, queue: Queue | str) -> int:
        name = queue if isinstance(queue, str) else self.queue_name(queue)
        await self._ready()
        async with self._topology() as channel:
            with map_exceptions(kind="queue", name=name):
                result = await channel.queue_purge(name)
            return int(result.message_count or 0)

    async def queue_counts(self, queue: Queue | str) -> tuple[int, int]:
        """``(messages ready, consumers)`` of an existing queue; TopologyError when it does not exist."""
        name = queue if isinstance(queue, str) else self.queue_name(queue)
        await self._ready()
        async with self._topology() as channel:
            with map_exceptions(kind="queue", name=name):
                result = await channel.queue_declare(name, passive=True)
            return int(result.message_count or 0), int(result.consumer_count or 0)

    async def _declare_exchange_on(self, exchange: Exchange) -> None:
        async with self._topology() as channel:
            with map_exceptions(kind="exchange", name=exchange.name):
                await channel.exchange_declare(
                    exchange=exchange.name,
                    exchange_type=str(exchange.type),
                    durable=exchange.durable,
                    auto_delete=exchange.auto_delete,
                    internal=exchange.internal,
                    arguments=dict(exchange.arguments) or None,
                )

    async def _declare_queue_on(self, queue: Queue) -> str:
        async with self._topology() as channel:
            with map_exceptions(kind="queue", name=queue.name):
                result = await channel.queue_declare(
                    queue=queue.name,
                    durable=queue.durable,
                    exclusive=queue.exclusive,
                    auto_delete=queue.auto_delete,
                    arguments=queue.declare_arguments() or None,
                )
            name = str(result.queue)
            if queue.server_named:
                self._queues[queue] = name
            return name

    async def _bind_on(self, binding: Binding) -> None:
        async with self._topology() as channel:
            queue_name = self.queue_name(binding.queue)
            with map_exceptions(kind="binding", name=f"{binding.exchange.name}->{queue_name}"):
                await channel.queue_bind(
                    queue=queue_name,
                    exchange=binding.exchange.name,
                    routing_key=binding.routing_key,
                    arguments=binding.bind_arguments() or None,
                )

    async def _ready(self, timeout: float | None = None) -> None:
        if self._closing:
            raise ConnectionLost("this Broker is closed")
        if self.is_connected:
            return
        if self._conn is None and self._reconnect_task is None:
            raise ConnectionLost("not connected: call connect() or use 'async with Broker(...)'")
        try:
            await self.wait_connected(self.settings.publish_timeout if timeout is None else timeout)
        except TimeoutError:
            raise ConnectionLost("not connected: the reconnect did not finish in time") from None

    # ------------------------------------------------------------------ publishing

    async def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str | Exchange = "",
        routing_key: str = "",
        mandatory: bool = False,
        confirm: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Publish and, with ``confirm`` (the default), wait for the broker's confirm.

        While disconnected it waits for the reconnect, up to ``timeout``
        (default ``settings.publish_timeout``), and publishes again after a
        connection lost mid-confirm (at-least-once: consumers may see a
        duplicate, with the same message id).

        Raises :class:`MessageTooLarge`, :class:`Unroutable` (mandatory and no
        queue took it), :class:`PublishNacked`, :class:`PublishTimeout`, or
        :class:`PublishError` (e.g. the exchange does not exist).
        """
        if _hooks.publish is not None and not _hooks.quiet.get():  # amqpkit.telemetry: traced, then back here
            await _hooks.publish(self, envelope, exchange, routing_key, mandatory, confirm, timeout)
            return
        body = envelope.body
        exchange_name = exchange if isinstance(exchange, str) else exchange.name
        if not confirm:
            if mandatory:
                raise ValueError("mandatory publishes need confirms to report a return")
            await self._publish_unconfirmed(body, envelope.properties(), exchange=exchange_name,
                                            routing_key=routing_key, timeout=timeout)  # fmt: skip
            return
        self._check_size(body)
        if self._closing:
            raise PublishError("this Broker is closed")
        if self._conn is None and self._reconnect_task is None:
            raise ConnectionLost("not connected: call connect() or use 'async with Broker(...)'")
        loop = asyncio.get_running_loop()
        wait = self.settings.publish_timeout if timeout is None else timeout
        deadline = loop.time() + wait
        properties = envelope.properties()
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    if not self._connected.is_set():
                        await self._connected.wait()
                    if exchange_name not in self._known_exchanges and exchange_name not in _BUILTIN_EXCHANGES:
                        await self._check_exchange(exchange_name)
                    channel = self._channels.get("publish")
                    if channel is None or channel.is_closed:
                        channel = await self._channel("publish", confirms=True)
                    with map_exceptions(kind="exchange", name=exchange_name):
                        await channel.basic_publish(
                            body,
                            exchange=exchange_name,
                            routing_key=routing_key,
                            properties=properties,
                            mandatory=mandatory,
                        )
                return
            except TimeoutError:
                state = "broker did not confirm" if self.is_connected else "broker not reachable"
                raise PublishTimeout(
                    f"publish to {exchange_name or '(default exchange)'!r} not confirmed within {wait:g} s ({state})"
                ) from None
            except TopologyError as exc:
                self._known_exchanges.discard(exchange_name)
                raise PublishError(f"publish refused: {exc}") from exc
            except ConnectionLost:
                if self._closing:
                    raise
                # The connection (or only this channel) died before the confirm: the
                # broker may or may not have the message, so it is sent again (at least
                # once). If the channel died alone the next loop reopens it, else it
                # waits for the reconnect.
                self.republished += 1
                await asyncio.sleep(0.01)
                continue

    @contextlib.asynccontextmanager
    async def _topology(self) -> AsyncIterator[AbstractChannel]:
        """The shared topology channel, one operation at a time.

        A refused declare makes the broker close the channel it came on, and
        aiormq fails every other call waiting on that channel with the same
        error: taking turns keeps each error with its own operation.
        """
        async with self._topology_lock:
            yield await self._channel("topology", confirms=False)

    async def _check_exchange(self, name: str) -> None:
        """Make sure an exchange we did not declare exists before publishing to it on the shared channel.

        A publish to a missing exchange makes the broker close the channel it
        came on, and every other publish in flight on that channel would be
        left unconfirmed (and sent again). The check costs one round trip per
        exchange per connection, on a channel of its own.
        """
        async with self._exchange_check_lock:
            if name in self._known_exchanges:
                return
            channel = await self._channel("check", confirms=False)
            with map_exceptions(kind="exchange", name=name):
                await channel.exchange_declare(exchange=name, passive=True)
            self._known_exchanges.add(name)

    def _check_size(self, body: bytes) -> None:
        limit = self.settings.max_message_size
        if len(body) > limit:
            raise MessageTooLarge(len(body), limit)

    async def _publish_unconfirmed(
        self,
        body: bytes,
        properties: Basic.Properties,
        *,
        exchange: str = "",
        routing_key: str = "",
        timeout: float | None = None,
    ) -> None:
        """Publish without a confirm: returns once the frames are queued for the socket.

        At most once: a message in flight when the connection drops is lost,
        and so is one sent to an exchange that does not exist (the broker
        closes the channel; the next publish opens another). Used for RPC
        replies and for one-way messages published with ``confirm=False``.
        """
        self._check_size(body)
        channel = self._channels.get("publish-fast")
        wait = self.settings.publish_timeout if timeout is None else timeout
        try:
            if channel is None or channel.is_closed or not self._connected.is_set():
                async with asyncio.timeout(wait):
                    await self._ready()
                    channel = await self._channel("publish-fast", confirms=False)
            with map_exceptions(kind="exchange", name=exchange):
                # aiormq bounds the wait for room in its write queue (a blocked connection).
                await channel.basic_publish(  # type: ignore[call-arg]  # aiormq's abc lags its Channel
                    body, exchange=exchange, routing_key=routing_key, properties=properties, wait=False, timeout=wait
                )
        except TimeoutError:
            shown = exchange or "(default exchange)"
            raise PublishTimeout(f"publish to {shown!r} not sent within {wait:g} s") from None

    # ------------------------------------------------------------------ consuming

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
    ) -> Consumer:
        """Attach ``callback`` to ``queue`` on a channel of its own, kept attached across reconnects.

        The queue is declared first (and remembered) unless ``declare=False``,
        for a queue someone else owns. Each delivery runs ``callback`` in its
        own task; settle it there (unless ``auto_ack``).
        """
        if declare and queue not in self._queues:
            await self.declare_queue(queue)
        consumer = Consumer(
            broker=self,
            queue=queue,
            callback=callback,
            prefetch=prefetch,
            auto_ack=auto_ack,
            exclusive=exclusive,
            arguments=dict(arguments or {}),
            on_error=on_error,
        )
        self._consumers[consumer.consumer_tag] = consumer
        try:
            await self._ready()
            # While we waited, a reconnect may have attached it already (it attaches every
            # registered consumer); _attach does nothing then.
            await self._attach(consumer)
        except ConnectionLost:
            # The connection dropped under the attach: the reconnect attaches it (it is
            # registered); wait for that rather than leave an attached consumer nobody holds.
            try:
                await self._ready()
                await self._attach(consumer)
            except BaseException:
                await self._detach(consumer, grace=0)
                raise
        except BaseException:
            await self._detach(consumer, grace=0)
            raise
        return consumer

    async def get(self, queue: Queue | str, *, auto_ack: bool = False) -> Delivery[bytes] | None:
        """One message from ``queue`` (basic.get), or None when it is empty."""
        name = queue if isinstance(queue, str) else self.queue_name(queue)
        await self._ready()
        channel = await self._channel("get", confirms=False)
        with map_exceptions(kind="queue", name=name):
            message = await channel.basic_get(name, no_ack=auto_ack)
        if not isinstance(message.delivery, Basic.GetOk):
            return None
        return Delivery.from_aiormq(message, auto_ack=auto_ack)

    async def _attach(self, consumer: Consumer) -> None:
        """Attach ``consumer`` on the current connection, unless it is attached already (or cancelled)."""
        async with consumer.attach_lock:
            if consumer.cancelled:
                return
            if consumer.channel is not None and not consumer.channel.is_closed:
                return
            await self._attach_now(consumer)

    async def _attach_now(self, consumer: Consumer) -> None:
        conn = self._conn
        if conn is None or conn.is_closed:
            raise ConnectionLost("not connected")
        queue_name = self.queue_name(consumer.queue)
        with map_exceptions(kind="queue", name=queue_name):
            channel = await conn.channel(publisher_confirms=False)
            await channel.basic_qos(prefetch_count=consumer.prefetch)

            async def on_message(message: DeliveredMessage) -> None:
                await self._dispatch(consumer, message)

            channel.on_consumer_cancel_callbacks.add(lambda frame: self._on_broker_cancel(consumer, channel))
            await channel.basic_consume(
                queue_name,
                on_message,
                no_ack=consumer.auto_ack,
                exclusive=consumer.exclusive,
                arguments=consumer.arguments or None,
                consumer_tag=consumer.consumer_tag,
            )
        consumer.channel = channel
        consumer.attached.set()
        generation = self.generation
        channel.closing.add_done_callback(lambda _: self._on_consumer_channel_closed(consumer, channel, generation))
        log.debug("consumer %s attached to %s", consumer.consumer_tag, queue_name)

    async def _dispatch(self, consumer: Consumer, message: DeliveredMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            consumer.inflight.add(task)
        try:
            delivery = Delivery.from_aiormq(message, auto_ack=consumer.auto_ack)
            if _hooks.consume is not None:  # amqpkit.telemetry: the callback in a CONSUMER span
                await _hooks.consume(consumer, delivery)
            else:
                await consumer.callback(delivery)
        except asyncio.CancelledError:
            if not consumer.cancelled:  # cut short by a lost channel or connection, not by a stop
                consumer.lost_in_flight += 1
            raise
        except Exception:
            # Patterns settle and log their own failures; this is the last net.
            log.exception("consumer %s callback failed", consumer.consumer_tag)
        finally:
            if task is not None:
                consumer.inflight.discard(task)

    def _on_consumer_channel_closed(self, consumer: Consumer, channel: AbstractChannel, generation: int) -> None:
        if consumer.cancelled or self._closing or consumer.channel is not channel:
            return
        consumer.attached.clear()
        consumer.channel = None
        if generation != self.generation or self._conn is None or self._conn.is_closed:
            return  # the reconnect re-attaches it
        log.warning("consumer %s lost its channel; re-attaching", consumer.consumer_tag)
        self._spawn(self._reattach(consumer))

    def _on_broker_cancel(self, consumer: Consumer, channel: AbstractChannel) -> None:
        """The broker cancelled the consumer (queue deleted, node down): declare the queue again and re-attach."""
        if consumer.cancelled or self._closing:
            return
        log.warning("broker cancelled consumer %s on %s; re-attaching", consumer.consumer_tag, self._shown(consumer))
        consumer.attached.clear()
        consumer.channel = None

        async def close_then_reattach() -> None:
            with contextlib.suppress(Exception):
                await channel.close()
            await self._reattach(consumer, redeclare=True)

        self._spawn(close_then_reattach())

    async def _reattach(self, consumer: Consumer, *, redeclare: bool = False) -> None:
        try:
            # Only a lost connection is worth retrying; a refused declare or a
            # missing queue goes straight to the consumer's on_error.
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(10),
                wait=self._wait_strategy(),
                retry=retry_if_exception_type(ConnectionLost),
                reraise=True,
            ):
                with attempt:
                    if consumer.cancelled or self._closing:
                        return
                    await self._ready()
                    if consumer.channel is not None:
                        return  # a reconnect got there first
                    if consumer.queue.server_named and consumer.queue not in self._queues:
                        raise TopologyError("its server-named queue is gone and was not ours to declare",
                                            kind="queue", name=consumer.queue.name)  # fmt: skip
                    if redeclare and consumer.queue in self._queues:
                        await self._declare_queue_on(consumer.queue)
                        for b in [b for b in self._bindings if b.queue == consumer.queue]:
                            await self._bind_on(b)
                    await self._attach(consumer)
        except Exception as exc:
            if consumer.cancelled or self._closing:
                return
            self._stop_consumer(consumer, exc)

    async def _detach(self, consumer: Consumer, *, grace: float) -> None:
        if consumer.cancelled:
            return
        consumer.cancelled = True
        self._consumers.pop(consumer.consumer_tag, None)
        channel, consumer.channel = consumer.channel, None
        consumer.attached.clear()
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.basic_cancel(consumer.consumer_tag), timeout=5)
        pending = {t for t in consumer.inflight if t is not asyncio.current_task()}
        if pending and grace > 0:
            await asyncio.wait(pending, timeout=grace)
        overdue = {t for t in pending if not t.done()}
        if overdue:
            # Out of grace: cancel them; their messages are nacked back to the queue
            # (a Worker does it explicitly; closing the channel does it for the rest).
            log.warning("consumer %s: %d callbacks still running after %.3g s; cancelling",
                        consumer.consumer_tag, len(overdue), grace)  # fmt: skip
            for task in overdue:
                task.cancel()
            await asyncio.wait(overdue, timeout=5)
        if channel is not None and not channel.is_closed:
            # Closing the channel returns whatever is still unacked to the queue.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), timeout=5)
        if consumer.lost_in_flight:
            n = consumer.lost_in_flight
            log.warning("consumer %s on %s stopped; %d message%s in flight %s lost with the connection or channel "
                        "while it ran (the broker delivers %s again)", consumer.consumer_tag, consumer.queue.name,
                        n, "s" if n != 1 else "", "were" if n != 1 else "was", "them" if n != 1 else "it")  # fmt: skip
        elif not self.is_connected:
            log.info("consumer %s on %s stopped while the connection was down", consumer.consumer_tag,
                     consumer.queue.name)  # fmt: skip


def _closed_on_open(exc: BaseException) -> bool:
    """The broker answered connection.open with connection.close: RabbitMQ's NOT_ALLOWED for a vhost."""
    text = str(exc)
    return "Connection.OpenOk" in text and "Connection.Close" in text


def _worth_retrying(exc: BaseException) -> bool:
    """A connect attempt is tried again unless the broker refused the login: that does not get better."""
    return isinstance(exc, _Unreachable) and not exc.refused


def _describe(spec: Exchange | Queue | Binding) -> str:
    if isinstance(spec, Exchange):
        return f"exchange {spec.name!r}"
    if isinstance(spec, Queue):
        return f"queue {spec.name or '(server-named)'!r}"
    return f"binding {spec.exchange.name!r} -> {spec.queue.name or '(server-named)'!r} ({spec.routing_key!r})"


def _discard(items: list[Any], item: Any) -> None:
    with contextlib.suppress(ValueError):
        items.remove(item)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _version(value: Any) -> tuple[int, ...]:
    match = re.match(r"\d+(?:\.\d+)*", _text(value))
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def _product(props: Any) -> tuple[str, str]:
    return _text(props.get("product", "?")), _text(props.get("version", "?"))
