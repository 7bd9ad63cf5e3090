"""The Broker's shared state, its channel pool, and the low-level seam patterns build on.

:class:`BrokerCore` holds what every part of the Broker reads: the current
connection, the channels kept per role, the topology remembered for
reconnects and the consumers kept attached. The parts themselves live in
their own modules, each a layer of the Broker:

- :mod:`amqpkit.registry`: declare, bind, delete, purge; what a reconnect declares again;
- :mod:`amqpkit.publishing`: the confirmed and the unconfirmed publish;
- :mod:`amqpkit.consuming`: consumers, attached and re-attached;
- :mod:`amqpkit.connection`: connect, reconnect, close (the :class:`~amqpkit.Broker` itself).

:class:`LowLevel` (``broker.lowlevel``) is the seam for patterns that need
more than publish and consume: raw channels, the unconfirmed publish with
prebuilt properties, the channel a delivery came on. amqpkit's own patterns
use it and nothing else of the core's insides; so can a pattern of your
own. Its types are aiormq's and pamqp's, stable within the aiormq version
amqpkit pins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiormq.exceptions
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic
from tenacity import RetryCallState
from yarl import URL

from . import aiormq_compat
from ._aio import first_of
from .errors import (
    ChannelLimitReached,
    ConnectionLost,
    MessageTooLarge,
    PublishTimeout,
    TopologyError,
    _NotBackInTime,
    map_exceptions,
    refused_error,
    reply_text,
)
from .message import CLOSING, Delivery, delivery_channel, delivery_from_aiormq
from .settings import BrokerSettings, redact_url
from .topology import Binding, Exchange, Queue

if TYPE_CHECKING:
    from .consuming import Consumer

__all__ = ["BrokerCore", "LowLevel"]

log = logging.getLogger("amqpkit.broker")

DisconnectCallback = Callable[[BaseException], None]
ReconnectCallback = Callable[[], Awaitable[None]]
TopologyErrorCallback = Callable[["Exchange | Queue | Binding", BaseException], None]


# The body of a received message while a copy of it is published (see LowLevel.sending_received): its id and
# length, not the object, so that the tasks started meanwhile (a channel's reader), which keep a copy of the
# context, do not keep the body in memory with it.
_received_body: ContextVar[tuple[int, int] | None] = ContextVar("amqpkit_received_body", default=None)

CHANNEL_CAP_HOLD_MAX = 300.0
"""The longest a limit on channels the broker counts (see :meth:`BrokerCore._new_channel`) is kept, in seconds."""


def channel_cap_hold(heartbeat: int) -> float:
    """How long a learned limit on channels is kept at first: until the broker has surely dropped a connection
    that went silent (three heartbeats), and 10 s more; a minute without heartbeats."""
    return 3 * heartbeat + 10.0 if heartbeat else 60.0


async def close_quietly(channel: AbstractChannel, timeout: float = 5.0) -> None:
    """Close ``channel`` within ``timeout`` seconds, its errors logged at DEBUG only (it is being let go of). Run it
    in a task that is not cancelled, or shield it: a close cancelled after its first frame makes aiormq send a
    second one, on a number the broker may have given out again.

    From its first frame on, the channel is in :data:`~amqpkit.message.CLOSING`: a delivery settled on it is
    refused as on a closed channel (its message goes back to the queue with the close). aiormq refuses only once
    the broker's close-ok is in, and an ack sent between the two reached the broker on a channel it had already
    let go of: it closed the whole connection (504 CHANNEL_ERROR, "expected 'channel.open'")."""
    CLOSING.add(channel)
    try:
        await asyncio.wait_for(channel.close(), timeout)
    except Exception as exc:
        log.debug("closing channel %s: %s", getattr(channel, "number", "?"), exc)


def _about_channels(exc: BaseException) -> bool:
    """Whether a 530 NOT_ALLOWED is RabbitMQ's over a limit on channels (3.10 and 4.x word both alike)."""
    text = reply_text(exc)
    return "number of channels" in text or "channel_max" in text


def version_numbers(server_properties: Mapping[str, Any]) -> tuple[int, ...]:
    """The version a broker announced on connect as numbers, e.g. (4, 0, 5); () when it is not known."""
    value = server_properties.get("version", "")
    text = value.decode() if isinstance(value, bytes) else str(value)
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


class _SameId:
    """Confirmed publishes of one message id in flight: how many, and whether another may join them."""

    __slots__ = ("count", "done", "shared")

    def __init__(self, done: asyncio.Future[None], *, shared: bool) -> None:
        self.done = done  # set when the last of them is settled
        self.count = 1
        self.shared = shared  # none is mandatory and no mandatory one waits: one that is not may join


@dataclass(slots=True)
class _Refusal:
    """The broker refusing the reconnects' login, while it does (see BrokerCore.access_refused): its last refusal
    (host:port, the broker's words, the vhost), since when (time.monotonic()), how many attempts it refused, and
    how many attempts in a row failed otherwise since (a round of URLs that does not refuse ends it)."""

    where: str
    words: str
    vhost: str
    since: float
    attempts: int = 1
    unrefused_in_a_row: int = 0

    def lasted(self) -> str:
        """How long and how many attempts so far: ``12.3 s (4 attempts)``."""
        n = self.attempts
        return f"{time.monotonic() - self.since:.1f} s ({n} attempt{'s' if n != 1 else ''})"


class BrokerCore:
    """State shared by the Broker's layers, with what each of them needs: readiness, channels, size checks."""

    def __init__(self, settings: BrokerSettings | str | None = None) -> None:
        if settings is None:
            settings = BrokerSettings.from_env()
        elif isinstance(settings, str):
            settings = BrokerSettings(url=settings)
        self.settings = settings
        self._conn: aiormq_compat.AmqpConnection | None = None
        self._channels: dict[str, AbstractChannel] = {}
        self._channel_lock = asyncio.Lock()
        self._exchanges: dict[str, Exchange] = {}
        self._queues: dict[Queue, str] = {}
        self._bindings: dict[Binding, None] = {}
        self._consumers: dict[str, Consumer] = {}
        self._connected = asyncio.Event()
        self._closing = False
        self._closed = asyncio.Event()  # set with _closing: ends every wait for the connection
        self._reconnect_task: asyncio.Task[None] | None = None
        self._blocked_at = 0.0  # loop time the broker last blocked the connection (see Broker.blocked)
        self._url_index = 0
        self._refusal: _Refusal | None = None  # while the broker refuses the reconnects' login (see access_refused)
        # The most channels the broker let this Broker have when it last refused one (a limit it counts itself, a
        # user's max-channels), kept until _channel_cap_until (loop time); see _new_channel.
        self._channel_cap: int | None = None
        self._channel_cap_until = 0.0
        self._channel_cap_hold = 0.0
        self._channel_cap_from: object = None  # the connection whose close taught it (one close refuses many)
        self._waiting_task: asyncio.Task[None] | None = None  # Consuming._attach_waiting, while a consumer waits
        # Specs a reconnect could not declare again because the broker refused access (403: permissions, a vhost
        # deleted and made again): kept remembered and declared again with the consumers refused so, by
        # Consuming._retry_refused (running in _access_task while any waits), once the broker allows them.
        self._access_refused: dict[Exchange | Queue | Binding, TopologyError] = {}
        # Of those, named exclusive queues another connection holds (405, TopologyRegistry._locked): since when
        # (time.monotonic()), and whether the WARNING that it lasts was logged.
        self._locked_since: dict[Queue, tuple[float, bool]] = {}
        self._access_task: asyncio.Task[None] | None = None
        # The bindings' keeper (TopologyRegistry._keep_bindings): its task; set to run it now rather than at its
        # period (a publish found an exchange of the Broker's own gone); the exchanges it found gone and could not
        # declare again, with since when (time.monotonic()), said once until they are back.
        self._binding_keeper: asyncio.Task[None] | None = None
        self._rebind_wanted = asyncio.Event()
        self._exchanges_gone: dict[str, float] = {}
        self._on_disconnect: list[DisconnectCallback] = []
        self._on_reconnect: list[ReconnectCallback] = []
        self._on_topology_error: list[TopologyErrorCallback] = []
        self._background: set[asyncio.Task[Any]] = set()
        # Exchanges a publish may use on the shared confirm channel: ours, or seen to exist on this connection.
        self._known_exchanges: set[str] = set()
        self._exchange_check_lock = asyncio.Lock()
        # Message ids of confirmed publishes in flight, each with what a publish of the same id waits on.
        self._ids_in_flight: dict[str, _SameId] = {}
        self._topology_lock = asyncio.Lock()
        self.generation = 0
        self.reconnects = 0
        # Confirmed publishes sent again: after the connection or the channel dropped mid-confirm, after the
        # broker closed the channel over another publish, or once after a nack (amqpkit.publishing).
        self.republished = 0
        # Confirmed publishes that were in flight when the broker closed the connection over a frame, sent again
        # one at a time, so that the one it could not read closes it alone (amqpkit.publishing).
        self._suspects = asyncio.Lock()
        # Set while no suspect is being sent: other confirmed publishes wait while one is, and the one being sent
        # waits first until those sent before it have settled (_sending of them in flight; _settled when none).
        self._alone = asyncio.Event()
        self._alone.set()
        self._sending = 0
        self._settled = asyncio.Event()
        self._settled.set()
        self._unwatch: Callable[[], None] | None = None  # the event-loop watchdog (amqpkit.watchdog)
        self._lowlevel = LowLevel(self)

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def access_refused(self) -> str | None:
        """Why the broker refuses this Broker's reconnects, while it does: the broker's words and since when, never
        the password; None otherwise.

        A reconnect whose login is refused (the password changed, the user deleted, its permissions on the vhost
        cleared, the vhost deleted) is tried again with the backoff, since access may be given back. Meanwhile
        what waits for the connection ends at its deadline with :class:`~amqpkit.AccessRefused`, not as if the
        broker were not reachable.
        """
        refusal = self._refusal
        if refusal is None or self.is_connected:
            return None
        return (f"the broker at {refusal.where} has refused this Broker's login for {refusal.lasted()}: "
                f"{refusal.words.rstrip('.')}; check the user, its password and its permissions on vhost "
                f"{refusal.vhost!r} (the Broker keeps trying)")  # fmt: skip

    @property
    def lowlevel(self) -> LowLevel:
        """Raw channels and the unconfirmed publish, for patterns (see :class:`LowLevel`)."""
        return self._lowlevel

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the Broker is connected (after a reconnect).

        :class:`~amqpkit.ConnectionLost` at once for a closed Broker, or one closed meanwhile. Past ``timeout``,
        a ``ConnectionLost`` that is also a ``TimeoutError`` and says why (an :class:`~amqpkit.AccessRefused`
        too while the broker refuses the reconnect's login).
        """
        if self._connected.is_set():
            return
        if self._closing:
            raise ConnectionLost("this Broker is closed")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            await first_of(self._connected.wait(), self._closed.wait(), timeout=left)
            if self._connected.is_set():
                return
            if self._closing:
                raise ConnectionLost("this Broker is closed")
            if deadline is not None and loop.time() >= deadline:
                break
            # Connected and lost again before this task ran (a node stopping just after the reconnect): wait on.
        refused = self.access_refused
        if refused is not None:
            raise refused_error(_NotBackInTime, f"not connected after {timeout} s: {refused}")
        raise _NotBackInTime(f"not connected after {timeout} s: the reconnect did not finish in time")

    def check_message_size(self, body: bytes) -> None:
        """Raise :class:`~amqpkit.MessageTooLarge` for a body over ``settings.max_message_size``, unless it is
        the body of a received message, sent on as it came (see :meth:`LowLevel.sending_received`)."""
        limit = self.settings.max_message_size
        if len(body) > limit and (id(body), len(body)) != _received_body.get():
            raise MessageTooLarge(len(body), limit)

    _check_size = check_message_size  # the name patterns used before check_message_size

    @property
    def current_url(self) -> str:
        """The URL this Broker is (or was last) connected to, without its password."""
        return self._current_url_safe()

    def _current_url_safe(self) -> str:
        urls = self.settings.urls
        return redact_url(urls[self._url_index % len(urls)])

    def _scrub(self, text: str) -> str:
        for url in self.settings.urls:
            password = URL(url).password
            if password:
                text = text.replace(password, "***")
        return text

    def _retry_delay(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (from 0) of a connect or of something the broker refused for now: the
        reconnect policy's backoff, ``initial_delay * multiplier ** attempt`` up to ``max_delay``, plus a random
        ``0..jitter`` s (tenacity's ``wait_exponential + wait_random``, which the reconnects used)."""
        p = self.settings.reconnect
        try:
            delay = min(p.initial_delay * p.multiplier**attempt, p.max_delay)
        except OverflowError:  # past max_delay long before
            delay = p.max_delay
        return delay + random.uniform(0, p.jitter)

    def _wait_strategy(self, state: RetryCallState) -> float:
        """The same backoff as tenacity's ``wait=``: its ``attempt_number`` counts from 1."""
        return self._retry_delay(state.attempt_number - 1)

    def _rebind_soon(self, exchange: str) -> None:
        """A publish found ``exchange`` missing: if the Broker declared it and binds to it a queue it consumes, the
        keeper of bindings declares it and binds again now, not at its next period (see
        TopologyRegistry._keep_bindings)."""
        if self._binding_keeper is None or self._exchanges.get(exchange) is None:
            return
        consumed = {c.queue for c in self._consumers.values() if not c.cancelled}
        if any(b.exchange.name == exchange and b.queue in consumed for b in self._bindings):
            self._rebind_wanted.set()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

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
            refused = self.access_refused
            if refused is not None:
                raise refused_error(ConnectionLost, f"not connected: {refused}") from None
            raise ConnectionLost("not connected: the reconnect did not finish in time") from None

    async def _new_channel(self, conn: aiormq_compat.AmqpConnection, **options: Any) -> AbstractChannel:
        """``conn.channel(**options)``, or :class:`ChannelLimitReached` without asking, past a limit known here.

        RabbitMQ closes the whole connection (530 NOT_ALLOWED) over a channel past the ``channel_max`` the
        handshake agreed on, or past a limit it counts itself over connections (a user's ``max-channels``).
        The first is known from the handshake. The second is learned from such a close: the channels open
        then are the most asked for, for a while (:func:`channel_cap_hold`, twice as long after each refusal
        in a row, up to :data:`CHANNEL_CAP_HOLD_MAX`), so that no other ask cuts the connection again meanwhile.
        The close itself is a lost connection (ConnectionLost, and the Broker reconnects), as it is.
        """
        limit = conn.connection_tune.channel_max or None
        learned = self._channel_cap if asyncio.get_running_loop().time() < self._channel_cap_until else None
        if learned is not None and (limit is None or learned < limit):
            limit = learned
        open_now = len(conn.channels)
        if limit is not None and open_now >= limit:
            raise ChannelLimitReached(self._cap_text(conn, limit), limit=limit)
        try:
            channel = await conn.channel(**options)
        except aiormq.exceptions.ConnectionNotAllowed as exc:
            if _about_channels(exc):
                self._learn_channel_cap(conn, open_now, exc)
            raise
        if self._channel_cap is not None and len(conn.channels) > self._channel_cap:
            self._channel_cap = None  # room past what the broker refused before: forgotten
        return channel

    def _cap_text(self, conn: aiormq_compat.AmqpConnection, limit: int) -> str:
        if limit == conn.connection_tune.channel_max:
            return f"the connection has the {limit} channels open that the broker allows on one (its channel_max)"
        left = self._channel_cap_until - asyncio.get_running_loop().time()
        return (f"the broker refused a channel past {limit} (a limit it counts, such as the user's max-channels); "
                f"no more are asked for during the next {left:.0f} s")  # fmt: skip

    def _learn_channel_cap(self, conn: aiormq_compat.AmqpConnection, open_now: int, exc: BaseException) -> None:
        if conn is self._channel_cap_from and self._channel_cap is not None:
            # Every open in flight fails with the close that refused one: the fewest open among them is the limit,
            # learned once (not a refusal in a row).
            self._channel_cap = min(self._channel_cap, open_now)
            return
        first = min(channel_cap_hold(self.settings.heartbeat), CHANNEL_CAP_HOLD_MAX)
        now = asyncio.get_running_loop().time()
        # refused again soon after the last limit ran out: kept twice as long
        again = self._channel_cap is not None and now < self._channel_cap_until + self._channel_cap_hold
        self._channel_cap_hold = min(max(self._channel_cap_hold * 2, first), CHANNEL_CAP_HOLD_MAX) if again else first
        self._channel_cap = open_now
        self._channel_cap_from = conn
        self._channel_cap_until = now + self._channel_cap_hold
        log.warning("the broker refused channel %d and closed the connection (%s); no more than %d channels are "
                    "asked for during the next %g s", open_now + 1, reply_text(exc), open_now,
                    self._channel_cap_hold)  # fmt: skip

    def _no_channel_until(self) -> float:
        """Loop time until which a limit learned from the broker allows no channel at all (0: it allows one)."""
        if self._channel_cap == 0 and asyncio.get_running_loop().time() < self._channel_cap_until:
            return self._channel_cap_until
        return 0.0

    async def _channel(self, role: str, *, confirms: bool = True) -> AbstractChannel:
        """The open channel kept for ``role`` on the current connection, reopened when it died."""
        channel = self._channels.get(role)
        if channel is not None and not aiormq_compat.closing(channel):
            return channel
        async with self._channel_lock:
            channel = self._channels.get(role)
            if channel is not None and not aiormq_compat.closing(channel):
                return channel
            conn = self._conn
            if conn is None or conn.is_closed:
                raise ConnectionLost("not connected")
            with map_exceptions(kind="channel", name=role):
                channel = await self._new_channel(conn, publisher_confirms=confirms, on_return_raises=confirms)
            self._channels[role] = channel
            return channel

    async def _open_channel(self, *, confirms: bool = False, prefetch: int | None = None) -> AbstractChannel:
        return await self._lowlevel.open_channel(confirms=confirms, prefetch=prefetch)

    async def _publish_unconfirmed(
        self,
        body: bytes,
        properties: Basic.Properties,
        *,
        exchange: str = "",
        routing_key: str = "",
        timeout: float | None = None,
    ) -> None:
        await self._lowlevel.publish_unconfirmed(
            body, properties, exchange=exchange, routing_key=routing_key, timeout=timeout
        )

    @contextlib.asynccontextmanager
    async def _topology(self) -> AsyncIterator[AbstractChannel]:
        """The shared topology channel, one operation at a time.

        A refused declare makes the broker close the channel it came on, and
        aiormq fails every other call waiting on that channel with the same
        error: taking turns keeps each error with its own operation.
        """
        async with self._topology_lock:
            yield await self._channel("topology", confirms=False)


class LowLevel:
    """The Broker's raw side (``broker.lowlevel``): for patterns that manage channels of their own.

    amqpkit's patterns (RPC, dead letters, work queues) use these and no
    private part of the Broker; a pattern of your own may too (see
    patterns/custom-pattern.md). Channels and properties here are aiormq's
    and pamqp's types: stable within the aiormq version amqpkit pins, and
    the one place they show.
    """

    __slots__ = ("_core", "_unconfirmed_in_flight")

    def __init__(self, core: BrokerCore) -> None:
        self._core = core
        self._unconfirmed_in_flight = 0  # publish_unconfirmed calls between their start and their return

    @staticmethod
    @contextlib.contextmanager
    def sending_received(body: bytes) -> Iterator[None]:
        """While publishing a copy of a received message whose body is ``body`` (the very object): amqpkit's own
        ``max_message_size`` does not refuse it.

        That limit keeps the broker from closing a channel over a body it would refuse; the broker took this
        one already, from a client that may have no such limit (RabbitMQ 3.10 takes 128 MiB by default). A
        Worker's retry or dead-letter copy and a DLQ replay are sent within it. The broker's own limit, if it
        has been lowered since, still applies.
        """
        token = _received_body.set((id(body), len(body)))  # the caller holds ``body`` meanwhile: the id is its
        try:
            yield
        finally:
            _received_body.reset(token)

    async def open_channel(self, *, confirms: bool = False, prefetch: int | None = None) -> AbstractChannel:
        """A new channel on the current connection (waiting for it while reconnecting).

        The caller owns it and closes it; it dies with the connection (see
        ``Broker.on_disconnect``).
        """
        core = self._core
        await core._connected.wait()
        conn = core._conn
        if conn is None:
            raise ConnectionLost("not connected")
        with map_exceptions(kind="channel"):
            channel = await core._new_channel(conn, publisher_confirms=confirms, on_return_raises=confirms)
            if prefetch is not None:
                await channel.basic_qos(prefetch_count=prefetch)
        return channel

    async def publish_unconfirmed(
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
        core = self._core
        core.check_message_size(body)
        channel = core._channels.get("publish-fast")
        conn = core._conn
        wait = core.settings.publish_timeout if timeout is None else timeout
        self._unconfirmed_in_flight += 1
        try:
            if channel is None or aiormq_compat.closing(channel) or conn is None or not core._connected.is_set():
                async with asyncio.timeout(wait):
                    await core._ready()
                    channel = await core._channel("publish-fast", confirms=False)
                conn = core._conn
            # The publish waits only for the channel's lock (held by another publish on it) or for room in
            # the connection's write queue (full: a blocked connection). With neither, it cannot wait, and
            # a timer armed for it (aiormq's timeout) would be set and cancelled for nothing on every reply.
            may_wait = self._unconfirmed_in_flight > 1 or conn is None or conn.write_queue.full()
            await aiormq_compat.publish_nowait(
                channel, body, exchange=exchange, routing_key=routing_key, properties=properties,
                timeout=wait if may_wait else None,
            )  # fmt: skip
        except TimeoutError:
            shown = exchange or "(default exchange)"
            said = f"publish to {shown!r} not sent within {wait:g} s"
            refused = core.access_refused
            if refused is not None:
                raise refused_error(PublishTimeout, f"{said}: {refused}") from None
            raise PublishTimeout(said) from None
        except Exception:
            # Translated here, off the hot path: a context manager entered on every publish costs.
            with map_exceptions(kind="exchange", name=exchange):
                raise
        finally:
            self._unconfirmed_in_flight -= 1

    # Publish on a channel of your own without waiting for the write (see :mod:`amqpkit.aiormq_compat`):
    # aiormq_compat's own function, not a coroutine wrapped around it (RpcClient sends every request through it).
    publish_nowait = staticmethod(aiormq_compat.publish_nowait)

    @staticmethod
    def hook_returns(channel: AbstractChannel, callback: Callable[[DeliveredMessage], None]) -> bool:
        """Route returned messages on a channel without confirms to ``callback``; False if aiormq does not allow it."""
        return aiormq_compat.hook_returns(channel, callback)

    @staticmethod
    def hook_deliveries(
        channel: AbstractChannel, consumer_tag: str, callback: Callable[[DeliveredMessage], None]
    ) -> bool:
        """Hand one consumer's deliveries to a plain function in the channel's reader, no task per delivery.

        For a consumer whose work per message is a few lines (completing a
        future): ``callback`` must not block. False if aiormq does not allow it.
        """
        return aiormq_compat.hook_deliveries(channel, consumer_tag, callback)

    @staticmethod
    def channel_of(delivery: Delivery[Any]) -> AbstractChannel | None:
        """The channel ``delivery`` came on (where it is settled), if any."""
        return delivery_channel(delivery)

    @staticmethod
    def delivery(message: DeliveredMessage, *, auto_ack: bool = False) -> Delivery[bytes]:
        """A :class:`~amqpkit.Delivery` from a message read on a raw channel (basic.get, basic.consume)."""
        return delivery_from_aiormq(message, auto_ack=auto_ack)
