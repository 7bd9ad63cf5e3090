"""Publishing: the confirmed publish (at least once, across reconnects) and the unconfirmed one.

A confirmed publish goes out on one shared channel with publisher confirms.
While the connection is down it waits for the reconnect, up to its deadline;
a publish whose confirm was lost with the connection is sent again, with the
same message id. An unconfirmed publish (``confirm=False``) goes through
:meth:`LowLevel.publish_unconfirmed <amqpkit.channels.LowLevel.publish_unconfirmed>`.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiormq
from aiormq.abc import AbstractChannel
from pamqp.commands import Basic

from . import _hooks, aiormq_compat
from .channels import BrokerCore, _SameId
from .errors import (
    ConnectionLost,
    MessageTooLarge,
    PublishError,
    PublishNacked,
    PublishTimeout,
    TopologyError,
    broker_size_limit,
    map_exceptions,
    publish_refused_for,
    refusal_is_for,
    refused_error,
)
from .message import ENCODER_REFUSALS, Envelope, basic_properties, explain_refusal
from .topology import Exchange

__all__ = ["Publishing"]

# Exchanges every vhost has: a publish to them never needs a check first.
_BUILTIN_EXCHANGES = frozenset(
    {"", "amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match", "amq.rabbitmq.trace"}
)


KNOWN_EXCHANGES_KEPT = 4096  # exchanges seen to exist that a publish need not check again, at most
RETIRE_AT_MOST_EVERY = 1.0  # seconds between two replacements of the publishing channel after nacks


# How RabbitMQ closes a connection over a frame it cannot take (502, 501, 505, 541, 503), as aiormq raises them;
# not over a limit, a forced close (an operator's, a restart) or an unreachable node, which are not the message's.
_FRAME_REFUSALS = (
    aiormq.exceptions.ConnectionSyntaxError,
    aiormq.exceptions.ConnectionFrameError,
    aiormq.exceptions.ConnectionUnexpectedFrame,
    aiormq.exceptions.ConnectionInternalError,
    aiormq.exceptions.ConnectionCommandInvalid,
)


def _count_frame_closes(exc: BaseException, before: int) -> int:
    """How many times the broker has closed the connection over a frame while one message was being published,
    ``exc`` counted; the third raises :class:`PublishError`.

    Perhaps the message itself (a header RabbitMQ cannot read): sent again after each reconnect, such a message
    closed every new connection until its deadline, and everything else on it each time. After the first such
    close a publish is sent again only alone (``_suspects``), so the others in flight beside it that time are
    confirmed one by one, and only the one the broker cannot read is refused three times. Alone means alone on
    the wire: new confirmed publishes wait while one is sent again, and it waits for those already sent to
    settle (before, each new one the broker could not read closed the connection under it too, and failed a
    good publish with the third such close). One by one costs a confirm's round trip each: 1 ms on localhost;
    over a 50 ms link, 300 of them take 15 s, and those whose deadline comes first end with
    :class:`PublishTimeout`. Unconfirmed publishes are not held back."""
    refused = _refused_frames(exc)
    if refused is None:
        return before
    if before + 1 >= 3:
        raise PublishError(
            f"the broker closed the connection each of the {before + 1} times this message was sent ({refused}); "
            "it may not be able to read it"
        ) from exc
    return before + 1


def _refused_frames(exc: BaseException) -> str | None:
    """The broker's words when ``exc`` comes from it closing the connection over a frame (see above), else None."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short chain: ConnectionLost from aiormq's exception
        if seen is None:
            return None
        if isinstance(seen, _FRAME_REFUSALS):
            return " ".join(str(arg) for arg in seen.args[:1]) or type(seen).__name__
        seen = seen.__cause__  # map_exceptions chains by cause; a context may be an unrelated earlier close
    return None


def _not_confirmed(exchange_name: str, wait: float, why: str) -> PublishTimeout:
    return PublishTimeout(
        f"publish to {exchange_name or '(default exchange)'!r} not confirmed within {wait:g} s ({why})"
    )


class Publishing(BrokerCore):
    """The Broker's publishing layer (a base of :class:`~amqpkit.Broker`)."""

    _publish_channel_retired = float("-inf")  # loop time the publishing channel was last replaced after a nack

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
        duplicate, with the same message id). A mandatory publish is the only
        confirmed publish of its message id in flight (others of that id wait
        for it, and it for them): a returned message is told apart from others
        by its id. Publishes that are not mandatory share an id freely. A
        publish the broker nacks is sent once more on a fresh channel (a
        channel opened during a failover can nack what a later one accepts),
        unless the channel was replaced less than a second before. A nack is
        for the whole publish: other queues it was routed to took it, twice if
        it was sent twice (:attr:`PublishNacked.sends`).

        Raises :class:`MessageTooLarge`, :class:`InvalidMessage` (a property or
        header AMQP cannot carry; nothing was sent), :class:`Unroutable` (mandatory and no
        queue took it), :class:`PublishNacked`, :class:`PublishTimeout`, or
        :class:`PublishError` (e.g. the exchange does not exist); TypeError for
        anything but an :class:`Envelope`, and for a body that is not bytes, a
        routing key that is not text or an exchange that is neither.
        """
        if not isinstance(envelope, Envelope):
            raise _not_an_envelope(envelope)
        if type(envelope.body) is not bytes or type(routing_key) is not str or not isinstance(exchange, str):
            _check_types(envelope.body, routing_key, exchange)  # the usual types pass with three cheap checks
        if _hooks.publish is not None and not _hooks.quiet.get():  # amqpkit.telemetry: traced, then sent below
            await _hooks.publish(self, envelope, exchange, routing_key, mandatory, confirm, timeout)
            return
        await self._publish(envelope.body, basic_properties(envelope), exchange, routing_key, mandatory, confirm,
                            timeout)  # fmt: skip

    async def _publish(
        self,
        body: bytes,
        properties: Basic.Properties,
        exchange: str | Exchange,
        routing_key: str,
        mandatory: bool,
        confirm: bool,
        timeout: float | None,
    ) -> None:
        """:meth:`publish` below the instrumentation hook, with the envelope's properties already built.

        The telemetry hook sends through here with its trace headers written into ``properties``, so a
        subclass's own ``publish`` runs once per message, instrumented or not.
        """
        exchange_name = exchange if isinstance(exchange, str) else exchange.name
        if not confirm:
            if mandatory:
                raise ValueError("mandatory publishes need confirms to report a return")
            await self.lowlevel.publish_unconfirmed(body, properties, exchange=exchange_name, routing_key=routing_key,
                                                    timeout=timeout)  # fmt: skip
            return
        self.check_message_size(body)
        if self._closing:
            raise PublishError("this Broker is closed")
        if self._conn is None and self._reconnect_task is None:
            raise ConnectionLost("not connected: call connect() or use 'async with Broker(...)'")
        loop = asyncio.get_running_loop()
        wait = self.settings.publish_timeout if timeout is None else timeout
        deadline = loop.time() + wait
        message_id = properties.message_id
        if not message_id:  # aiormq gives it a random one
            await self._publish_confirmed(body, properties, exchange_name, routing_key, mandatory, deadline, wait)
            return
        # aiormq ties a basic.return to the latest publish in flight with the returned message's id: with two
        # of one id in flight, a returned one could be reported confirmed. Only a mandatory publish comes back,
        # so it goes alone; publishes of its id that are not mandatory may go together.
        while (earlier := self._ids_in_flight.get(message_id)) is not None:
            if not mandatory and earlier.shared:
                earlier.count += 1
                slot = earlier
                break
            earlier.shared = False  # a mandatory publish waits: later ones queue behind it
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(earlier.done)
            except TimeoutError:
                why = f"waiting for an earlier publish of message id {message_id!r}"
                raise _not_confirmed(exchange_name, wait, why) from None
        else:
            slot = self._ids_in_flight[message_id] = _SameId(loop.create_future(), shared=not mandatory)
        try:
            await self._publish_confirmed(body, properties, exchange_name, routing_key, mandatory, deadline, wait)
        finally:
            slot.count -= 1
            if not slot.count:
                del self._ids_in_flight[message_id]
                slot.done.set_result(None)

    async def _publish_confirmed(
        self,
        body: bytes,
        properties: Basic.Properties,
        exchange_name: str,
        routing_key: str,
        mandatory: bool,
        deadline: float,
        wait: float,
    ) -> None:
        refusals = 0
        nacked = False
        closed_over_frames = 0
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    suspect = closed_over_frames > 0  # sent again alone (see _count_frame_closes)
                    if suspect or not self._alone.is_set():
                        await self._take_turn(suspect)
                    counted = False
                    try:
                        if not self._connected.is_set():
                            await self._connected.wait()
                        if exchange_name not in self._known_exchanges and exchange_name not in _BUILTIN_EXCHANGES:
                            await self._exchange_for_publish(exchange_name)
                        channel = self._channels.get("publish")
                        if channel is None or aiormq_compat.closing(channel):
                            channel = await self._channel("publish", confirms=True)
                        if suspect:
                            await self._others_settled()
                        elif not (counted := self._count_sending()):
                            continue  # a publish to send alone came meanwhile: this one waits for it
                        with map_exceptions(kind="exchange", name=exchange_name):
                            # Not waiting for the frames to be written (the confirm says more): aiormq holds the
                            # channel's lock until then, and publishes queued behind that lock were written even
                            # after the broker had closed the channel, which then closed the whole connection.
                            await channel.basic_publish(  # type: ignore[call-arg]  # aiormq's abc lags its Channel
                                body,
                                exchange=exchange_name,
                                routing_key=routing_key,
                                properties=properties,
                                mandatory=mandatory,
                                wait=False,
                            )
                    finally:
                        self._end_turn(suspect, counted)
                return
            except ENCODER_REFUSALS:
                # Nothing was sent (aiormq encodes the frames before it queues them): said in words, or as it is
                explain_refusal(properties, routing_key)
                raise
            except TimeoutError:
                raise self._unconfirmed_error(exchange_name, wait, closed_over_frames) from None
            except TopologyError as exc:
                refusals = self._after_refusal(exc, exchange_name, routing_key, len(body), refusals)
                continue
            except PublishNacked as exc:
                # The next publish goes on a fresh channel. On RabbitMQ 3.10 a channel opened while a quorum
                # queue had no leader (a reconnect within a failover) nacked every publish to it for minutes,
                # while a channel opened later had the same publishes acked. So a nacked publish is sent once
                # more, if that channel was replaced (at most once a second: a full queue's nacks come fast).
                self._retire_publish_channel(channel)
                if nacked or self._channels.get("publish") is channel:
                    raise (_nacked_twice(exc) if nacked else exc) from exc.__cause__  # the broker's nack
                nacked = True
                self.republished += 1
                continue
            except ConnectionLost as exc:
                if self._closing:
                    raise
                # The connection (or only this channel) died before the confirm: the
                # broker may or may not have the message, so it is sent again (at least
                # once). If the channel died alone the next loop reopens it, else it
                # waits for the reconnect.
                closed_over_frames = _count_frame_closes(exc, closed_over_frames)
                self.republished += 1
                await asyncio.sleep(0.01)
                continue

    async def _take_turn(self, suspect: bool) -> None:
        """A suspect (see :func:`_count_frame_closes`) takes the suspects' lock and holds new publishes back; any
        other publish waits while one is sent."""
        if suspect:
            await self._suspects.acquire()
            self._alone.clear()
        else:
            await self._alone.wait()

    def _count_sending(self) -> bool:
        """Just before a publish that is not a suspect is sent: counted in flight, unless a suspect came meanwhile
        (False: it waits for it)."""
        if not self._alone.is_set():
            return False
        self._sending += 1
        return True

    def _end_turn(self, suspect: bool, counted: bool) -> None:
        """After a publish that :meth:`_take_turn` or :meth:`_count_sending` let go: the next may."""
        if suspect:
            self._alone.set()
            self._suspects.release()
        elif counted:
            self._sending -= 1
            if not self._sending:
                self._settled.set()

    async def _others_settled(self) -> None:
        """Wait until no publish sent beside a suspect (see :func:`_count_frame_closes`) is still in flight, so that
        the suspect is alone on the wire and a close over a frame is its own."""
        while self._sending:
            self._settled.clear()
            await self._settled.wait()

    def _after_refusal(self, exc: TopologyError, exchange_name: str, routing_key: str, size: int, refusals: int) -> int:
        """The broker closed the publishing channel over a publish: this one, or another one in flight on it (say,
        to an exchange someone deleted since it was checked), which fails them all alike. This one's exchange is
        checked again and it is sent again; refused three times, it is its own (PublishError). Returns the
        refusals counted so far.

        A refusal of a body for its size by the broker's own limit, lower than amqpkit's, names the limit: a
        body under it was not the one refused, and is sent again without counting it (a review had small
        publishes fail beside large ones). A body over it is sent once more, on a fresh channel (RabbitMQ 3.10
        reads its limit when it opens a channel, so a channel opened while it was lower refuses what a fresh
        one takes), then it is MessageTooLarge.

        A refusal by a permission names the exchange, and the routing key for a topic permission: a publish
        it does not name is sent again without counting it, and the one it names fails at once, since a
        permission does not change between two tries (before, one refused publish in 25 made 300 of 1,000
        allowed ones beside it fail with its error, in a hunt)."""
        refused_for = publish_refused_for(exc)
        mine = refusal_is_for(refused_for, exchange_name, routing_key) if refused_for is not None else None
        if mine is True:
            raise PublishError(f"publish refused: {exc}") from exc
        if mine is False:
            self.republished += 1
            return refusals
        # A cut text whose names begin like this publish's: counted, as any refusal it cannot place.
        limit = broker_size_limit(exc)
        if limit is not None and size <= limit:
            self.republished += 1
            return refusals
        refusals += 1
        if limit is not None and refusals >= 2:
            raise MessageTooLarge(size, limit, by_broker=True) from exc
        self._known_exchanges.discard(exchange_name)
        if refusals >= 3:
            raise PublishError(f"publish refused: {exc}") from exc
        self.republished += 1
        return refusals

    async def _exchange_for_publish(self, name: str) -> None:
        """:meth:`_check_exchange`, its refusal a :class:`PublishError`."""
        try:
            await self._check_exchange(name)
        except TopologyError as exc:
            self._rebind_soon(name)  # one of the Broker's own, that queues it consumes are bound to: made again now
            raise PublishError(f"publish refused: {exc}") from exc

    def _unconfirmed_error(self, exchange_name: str, wait: float, closed_over_frames: int) -> Exception:
        """The error of a confirmed publish whose deadline passed, saying why as far as the Broker knows."""
        refused = self.access_refused
        if refused is not None:  # not "not reachable": the broker answers, and refuses the login
            shown = exchange_name or "(default exchange)"
            return refused_error(PublishTimeout, f"publish to {shown!r} not confirmed within {wait:g} s: {refused}")
        return _not_confirmed(exchange_name, wait, self._why_unconfirmed(closed_over_frames))

    def _why_unconfirmed(self, closed_over_frames: int) -> str:
        if not self.is_connected:
            return "broker not reachable"
        if closed_over_frames:
            return "waiting to be sent again alone, after the broker closed the connection over a frame"
        if not self._alone.is_set():
            return "waiting while a publish the broker closed the connection over is sent again alone"
        blocked = self._conn.blocked if self._conn is not None else None
        if blocked is not None:
            return f"the broker has blocked this connection: {blocked}"
        return "broker did not confirm"

    def _retire_publish_channel(self, channel: AbstractChannel | None) -> None:
        """Stop using ``channel`` for publishes; close it once the confirms it still waits for are in."""
        if channel is None or self._channels.get("publish") is not channel:
            return  # already replaced (another publish on it was nacked too)
        now = asyncio.get_running_loop().time()
        if now - self._publish_channel_retired < RETIRE_AT_MOST_EVERY:
            return  # a full queue nacks in bursts: one new channel a second is enough, not one per nack
        self._publish_channel_retired = now
        del self._channels["publish"]

        async def close_when_settled(retired: AbstractChannel) -> None:
            waiting = list(getattr(retired, "confirmations", {}).values())
            if waiting:
                await asyncio.wait(waiting, timeout=self.settings.publish_timeout)
            with contextlib.suppress(Exception):
                await retired.close()

        self._spawn(close_when_settled(channel))

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
            if len(self._known_exchanges) >= KNOWN_EXCHANGES_KEPT:
                # A cache of checks: it grew by one for every exchange name ever published to (1,724 after 5
                # minutes of short-lived exchanges, in a hunt). Started again; the next publishes check again.
                self._known_exchanges = {e.name for e in self._exchanges.values()}
            self._known_exchanges.add(name)


def _not_an_envelope(value: object) -> TypeError:
    """What Broker.publish raises for a body handed to it bare (its callers used to meet an AttributeError)."""
    return TypeError(
        f"Broker.publish takes an amqpkit.Envelope, not {type(value).__name__}: wrap the body, "
        "Envelope(body=b'...'), or publish values through a Publisher, which encodes them"
    )


def _check_types(body: object, routing_key: object, exchange: object) -> None:
    """TypeError for a body, routing key or exchange of a type a publish cannot send, before anything is sent.
    Before: aiormq's "sequence item 1: expected a bytes-like object, str found" for a text body, "object of type
    'NoneType' has no len()" for a routing key of None, an AttributeError for an exchange of None."""
    if not isinstance(body, bytes | bytearray | memoryview):
        hint = ": encode it (body.encode()), or publish values through a Publisher and its codec"
        raise TypeError(
            f"a message body must be bytes, not {type(body).__name__}{hint if isinstance(body, str) else ''}"
        )
    if not isinstance(routing_key, str):
        raise TypeError(f"a routing key must be text, not {type(routing_key).__name__}")
    if not isinstance(exchange, str | Exchange):
        raise TypeError(f"exchange must be its name or an amqpkit.Exchange, not {type(exchange).__name__}")


def _nacked_twice(exc: PublishNacked) -> PublishNacked:
    """``exc``, the second nack of a publish sent once more on a fresh channel, saying so: whatever queue took it
    the first time took it again."""
    return PublishNacked(
        f"{exc}; it was sent twice (once more on a fresh channel), both nacked: the other queues it was routed to "
        "may hold it twice",
        sends=2,
    )
