"""The Broker: one connection, kept alive, with the topology and consumers it carries.

The Broker is the one place that talks to aiormq. It

- connects with backoff (tenacity), trying every URL in order;
- after a lost connection reconnects by itself, declares again every
  exchange, queue and binding it declared, and attaches every consumer
  again (it holds them by strong reference: nothing is left to weak refs);
- publishes on one channel with publisher confirms, waiting for a
  reconnect up to the publish deadline instead of dropping the message;
- gives each consumer a channel of its own with its own prefetch.

This module holds the connection's lifecycle (connect, reconnect, close);
the Broker's other layers are its bases, each in a module of its own:
:mod:`amqpkit.channels` (shared state, channel pool, the low-level seam),
:mod:`amqpkit.registry` (topology), :mod:`amqpkit.publishing` and
:mod:`amqpkit.consuming`. aiormq's internals are in :mod:`amqpkit.aiormq_compat`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any, Self

import aiormq
import aiormq.exceptions
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
)
from yarl import URL

from . import _hooks
from ._aio import first_of
from .aiormq_compat import AmqpConnection, ClosedOnOpen, closed_on_open
from .channels import DisconnectCallback, ReconnectCallback, TopologyErrorCallback, _Refusal, version_numbers
from .consuming import Consumer, ConsumerCallback, Consuming
from .errors import AccessRefused, ChannelLimitReached, ConnectError, ConnectionLost, TopologyError
from .publishing import Publishing
from .settings import TlsSettings, host_port, redact_url
from .unreadable import install, reading_leniently
from .watchdog import blocked_note, watch

__all__ = ["Broker", "Consumer", "ConsumerCallback"]

log = logging.getLogger("amqpkit.broker")


_CONNECTION_LIMIT = re.compile(r"connection limit \(\d+\) is reached")
"""RabbitMQ's words for a user's or a vhost's ``max-connections`` reached (530 NOT_ALLOWED, on 3.10 and 4.x)."""
_REFUSALS = (530, 403)
"""Reply codes of a close on open that trying again does not mend (a vhost refused or missing, access refused);
any other (320 CONNECTION_FORCED while the node stops, 541 while a vhost restarts) is tried again."""


class _Unreachable(Exception):
    """One failed connection attempt (internal; becomes ConnectError)."""

    def __init__(self, where: str, reason: str, *, vhost: str, refused: bool = False, limit: bool = False) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where  # host:port, no credentials
        self.reason = reason  # the broker's words, or what failed; the password scrubbed
        self.vhost = vhost
        self.refused = refused  # the login or the vhost refused: trying again does not help
        self.limit = limit  # the broker's limit on connections reached: room again once another one closes


class Broker(Consuming, Publishing):
    """A RabbitMQ connection that stays up: use as ``async with Broker(settings) as broker``."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else ("closed" if self._closing else "disconnected")
        return f"<Broker {', '.join(self.settings.safe_urls)} {state}>"

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
        return version_numbers(self.server_properties)

    @property
    def blocked(self) -> str | None:
        """Why the broker has blocked this connection (e.g. "low on memory"), or None while it has not.

        During a memory or disk alarm, RabbitMQ blocks a connection once it publishes and then reads nothing
        more from it until the alarm clears: no publish is confirmed, no declare or ack is read. Publishes end
        with :class:`PublishTimeout` at their deadline, and an :class:`RpcClient` sends no request meanwhile
        (its calls end with :class:`RpcTimeout`).
        """
        conn = self._conn
        return conn.blocked if conn is not None and not conn.is_closed else None

    async def wait_unblocked(self) -> None:
        """Return once the broker does not block this connection (at once if it does not), or it is lost."""
        conn = self._conn
        if conn is None or conn.blocked is None or conn.is_closed:
            return
        await first_of(conn.unblocked.wait(), conn.closing)

    def _blocked_changed(self, conn: AmqpConnection, reason: str | None) -> None:
        if conn is not self._conn:
            return
        now = asyncio.get_running_loop().time()
        if reason is not None:
            self._blocked_at = now
            log.warning("the broker at %s blocked this connection: %s; until it unblocks it, it reads nothing "
                        "from it (publishes are not confirmed, declares and acks wait)",
                        self._current_url_safe(), reason)  # fmt: skip
        else:
            log.info("the broker at %s unblocked this connection after %.1f s",
                     self._current_url_safe(), now - self._blocked_at)  # fmt: skip

    async def connect(self) -> None:
        """Connect, trying each URL in turn with backoff; :class:`ConnectError` when all fail."""
        if self._closing:
            raise ConnectError("this Broker was closed; make a new one")
        if self.is_connected:
            return
        policy = self.settings.reconnect
        n_urls = len(self.settings.urls)
        failures: list[str] = []
        refusals: dict[int, str] = {}  # URL index: the last refusal of the login there

        def worth_retrying(exc: BaseException) -> bool:
            # A refused login does not get better by waiting, but another URL (other credentials, another node)
            # may let this Broker in: it stops once every URL has refused.
            return isinstance(exc, _Unreachable) and (not exc.refused or len(refusals) < n_urls)

        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(policy.connect_attempts * n_urls),
                wait=self._wait_strategy,
                retry=retry_if_exception(worth_retrying),
                reraise=True,
            ):
                with attempt:
                    index = self._url_index % n_urls
                    try:
                        await self._open()
                    except _Unreachable as exc:
                        log.warning("connect to %s failed: %s", exc.where, exc.reason)
                        failures.append(str(exc))
                        if exc.refused:
                            refusals[index] = str(exc)
                        raise
        except _Unreachable as exc:
            targets = ", ".join(dict.fromkeys(host_port(u) for u in self.settings.urls))
            last = failures[-1] if failures else "no attempt made"
            attempts = f"{len(failures)} attempt{'s' if len(failures) != 1 else ''}"
            if refusals:
                refused = list(refusals.values())[-1]
                rest = "" if exc.refused else f"; the last attempt: {last}"
                raise AccessRefused(
                    f"RabbitMQ refused the login after {attempts} (check user, password and vhost): {refused}{rest}"
                ) from None
            if exc.limit:
                raise ConnectError(
                    f"RabbitMQ allows this user or vhost no more connections, after {attempts}: {last}",
                    reason="limit",
                ) from None
            raise ConnectError(f"cannot connect to RabbitMQ at {targets} after {attempts}: {last}") from None
        if self._unwatch is None:
            self._unwatch = watch(self.settings.loop_block_threshold, self.settings.heartbeat)
        self._keep_bindings_running()

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop consumers (letting running callbacks finish within ``grace``), then close."""
        if self._closing:
            return
        self._closing = True
        self._closed.set()
        if _hooks.closed is not None:
            _hooks.closed(self)
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
    def background_tasks(self) -> frozenset[asyncio.Task[Any]]:
        """Re-attaches and reconnects running in the background (held here so none is garbage-collected)."""
        tasks = set(self._background)
        if self._reconnect_task is not None and not self._reconnect_task.done():
            tasks.add(self._reconnect_task)
        return frozenset(tasks)

    async def _open(self) -> None:
        """One attempt at the current URL; on failure move to the next and raise _Unreachable."""
        urls = self.settings.urls
        raw = urls[self._url_index % len(urls)]
        url = URL(raw)
        vhost = url.path[1:] or "/"
        url = url.update_query(heartbeat=str(self.settings.heartbeat))
        context = None
        if url.scheme == "amqps":
            tls = self.settings.tls
            context = (tls or TlsSettings()).ssl_context()  # verification on, the system's CAs by default
        properties: dict[str, Any] = {}
        if self.settings.connection_name:
            properties["connection_name"] = self.settings.connection_name
        wait = self._no_channel_until() - asyncio.get_running_loop().time()
        if wait > 0:
            # The broker allowed no channel at all (its count may still hold a dead connection's): a connection
            # now could not open the first, so none is made until then.
            log.info("waiting %.1f s for the broker to allow a channel before connecting", wait)
            await asyncio.sleep(wait)
        conn = AmqpConnection(url, context=context, client_properties=properties)
        conn.on_blocked = lambda reason: self._blocked_changed(conn, reason)
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0  # more after the attempt: it was cancelled
        out_of_time = asyncio.timeout(self.settings.connect_timeout)
        try:
            async with out_of_time:
                await asyncio.create_task(_connect_reading_leniently(conn))
                await self._setup(conn)
        except (Exception, asyncio.CancelledError) as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=1)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if task is not None and (
                task.cancelling() > cancels or (task is self._reconnect_task and (self._closing or task.cancelling()))
            ):
                # Cancelled during the attempt (connect()'s caller, a timeout around it, close() cancelling the
                # reconnect): aiormq's connect may end with the connection's error ("the connection's reader
                # stopped") instead of the cancellation. Taken for one more failed attempt, a cancelled connect()
                # went on to its next ones (20 s on a broker that said nothing), and the reconnect for ever.
                # (The attempt's own timeout is not counted: it takes its cancel back as it expires.)
                raise asyncio.CancelledError from exc
            self._url_index += 1
            refused = isinstance(
                exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError
            )
            said = exc if isinstance(exc, ClosedOnOpen) else None  # the broker's close, with its reason
            limit = said is not None and said.reply_code == 530 and bool(_CONNECTION_LIMIT.search(said.reply_text))
            if isinstance(exc, TimeoutError) or out_of_time.expired():  # aiormq may end it with its own error instead
                reason = f"timed out after {self.settings.connect_timeout:g} s"
            elif refused:
                reason = self._scrub(str(exc.args[0]) if exc.args else str(exc))
            elif said is not None and (limit or said.reply_code not in _REFUSALS):
                # a limit on connections reached, or a close that may not last (320 the node stopping, 541 a vhost
                # restarting): tried again, with the broker's words
                reason = self._scrub(f"{said.reply_code} {said.reply_text}")
            elif closed_on_open(exc):
                refused = True
                if said is not None:  # the broker's own words, e.g. "NOT_ALLOWED - vhost x not found"
                    reason = self._scrub(said.reply_text)
                else:
                    reason = f"NOT_ALLOWED - vhost {vhost!r} does not exist or the user may not use it"
            else:
                reason = self._scrub(f"{type(exc).__name__}: {exc}")
            raise _Unreachable(host_port(raw), reason, vhost=vhost, refused=refused, limit=limit) from None
        # A reconnect says so once, in _reconnect; the first connect says where it went.
        log.log(
            logging.INFO if self._reconnect_task is None else logging.DEBUG,
            "connected to %s (%s %s)", redact_url(raw), *_product(conn.server_properties),
        )  # fmt: skip

    async def _setup(self, conn: AmqpConnection) -> None:
        """Make ``conn`` current: channels, topology, consumers, then mark connected.

        What the broker refuses (a queue gone that is not ours to declare, one
        re-declared with other arguments, ...) does not stop the rest: each
        refused spec is forgotten and reported, and every consumer that
        depended on it stops with the error passed to its ``on_error``. A
        refusal of access (403 ACCESS_REFUSED), which an operator may lift,
        is not given up: the spec stays remembered, its consumers wait (not
        attached, ``Consumer.error`` set), and both are tried again in the
        background until the broker allows them. Only a lost connection
        fails the attempt (and is retried).
        """
        self._conn = conn
        self._channels.clear()
        self._known_exchanges.clear()
        self.generation += 1
        await self._channel("publish")
        await self._streams_gone(list(self._queues))  # deleted while the connection was down: declared anew
        refused, failed_queues = await self._restore_topology()
        stopped: list[tuple[Consumer, BaseException]] = []
        refused_access: list[tuple[Consumer, TopologyError]] = []
        starting_refused: list[tuple[Consumer, BaseException]] = []
        for consumer in list(self._consumers.values()):
            cause = failed_queues.get(consumer.queue)
            if consumer._starting:  # the consume() starting it attaches it once connected, or raises
                if cause is not None:
                    starting_refused.append((consumer, cause))
                continue
            if cause is None:
                try:
                    await self._attach(consumer)
                    continue
                except TopologyError as exc:
                    cause = exc
                except ChannelLimitReached as exc:  # refused without asking: the connection is up
                    self._wait_for_channel(consumer, exc)
                    continue
            if isinstance(cause, TopologyError) and self._waits_out(consumer.queue, cause):
                refused_access.append((consumer, cause))
                continue
            stopped.append((consumer, cause))
        generation = self.generation
        conn.closing.add_done_callback(lambda fut: self._on_closed(fut, generation))
        self._connected.set()
        kept = {spec for spec, error in refused if self._waits_out(spec, error)}
        for spec in [s for s in self._access_refused if s not in kept]:
            del self._access_refused[spec]  # declared again by this reconnect (or with its queue, later)
        for refused_spec, error in refused:
            if refused_spec in kept:
                self._keep_refused(refused_spec, error)
            else:
                self._forget_refused(refused_spec, error)
        if self._access_refused:
            self._retry_refused_soon()
        for waiting, refusal in refused_access:
            self._wait_for_access(waiting, refusal)
        for starting, why in starting_refused:  # its queue is forgotten now: consume() raises why, when it wakes
            starting._refused = why
        for stopped_consumer, why in stopped:
            self._stop_consumer(stopped_consumer, why)

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
        self._consumers_detached()
        for callback in list(self._on_disconnect):
            try:
                callback(lost)
            except Exception:
                log.exception("disconnect callback failed")
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        started = asyncio.get_running_loop().time()
        # Tried until it succeeds or the Broker is closed, a refused login too: access may be given back.
        async for attempt in AsyncRetrying(wait=self._wait_strategy, retry=retry_if_exception_type(_Unreachable)):
            if self._closing:
                return  # closed between two attempts
            with attempt:
                try:
                    await self._open()
                except _Unreachable as exc:
                    self._reconnect_failed(exc)
                    raise
        self.reconnects += 1
        took = asyncio.get_running_loop().time() - started
        log.info("reconnected to %s in %.2f s%s", self._current_url_safe(), took, self._refusal_ended())
        if _hooks.reconnected is not None:
            _hooks.reconnected(self, took)
        for callback in list(self._on_reconnect):
            try:
                await callback()
            except Exception:
                log.exception("reconnect callback failed")

    def _reconnect_failed(self, exc: _Unreachable) -> None:
        """Log a failed reconnect attempt: each one when the broker is not reachable; a refused login once when
        the refusal starts (or its words change), then at DEBUG, so that a refusal is one clear line, not one a
        few seconds for as long as it lasts. Keeps what :attr:`access_refused` says."""
        if not exc.refused:
            log.warning("connect to %s failed: %s", exc.where, exc.reason)
            refusal = self._refusal
            if refusal is not None:
                refusal.unrefused_in_a_row += 1
                if refusal.unrefused_in_a_row >= len(self.settings.urls):  # no URL refuses any more
                    log.info("the broker no longer refuses the login%s", self._refusal_ended())
            return
        refusal = self._refusal
        if refusal is not None:
            said_before = refusal.words
            refusal.where, refusal.words, refusal.vhost = exc.where, exc.reason, exc.vhost
            refusal.attempts += 1
            refusal.unrefused_in_a_row = 0
            if said_before == exc.reason:
                log.debug("connect to %s failed: %s", exc.where, exc.reason)
            else:  # another cause (an operator half-way through giving access back): said, once
                log.warning("the broker at %s still refuses this Broker's login, now: %s", exc.where, exc.reason)
            return
        self._refusal = _Refusal(exc.where, exc.reason, exc.vhost, since=time.monotonic())
        log.error("the broker at %s refused this Broker's login at a reconnect: %s; check the user, its password "
                  "and its permissions on vhost %r. Trying again every %g s at most, without a line per attempt; "
                  "meanwhile what waits for the connection ends at its deadline with AccessRefused",
                  exc.where, exc.reason.rstrip("."), exc.vhost, self.settings.reconnect.max_delay)  # fmt: skip

    def _refusal_ended(self) -> str:
        """Forget a refusal of the login: what to add to the line that says it ended ('' when there was none)."""
        refusal, self._refusal = self._refusal, None
        return "" if refusal is None else f"; the broker had refused the login for {refusal.lasted()}"


install()  # amqpkit's connections read what another client sent that pamqp cannot (amqpkit.unreadable)


async def _connect_reading_leniently(conn: AmqpConnection) -> None:
    """Open ``conn`` in a task of its own, marked so that its reader (a task made from this one) reads what
    pamqp cannot; the caller's context is not marked (aiormq connections it opens read as pamqp does)."""
    reading_leniently()
    await conn.connect()


def _discard(items: list[Any], item: Any) -> None:
    with contextlib.suppress(ValueError):
        items.remove(item)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _product(props: Any) -> tuple[str, str]:
    return _text(props.get("product", "?")), _text(props.get("version", "?"))
