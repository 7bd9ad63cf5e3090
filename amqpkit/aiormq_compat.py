"""Every use amqpkit makes of aiormq beyond its declared API, in one place.

aiormq is pinned to the minor version these were checked against (see
``pyproject.toml``); ``tests/test_aiormq_compat.py`` fails if any of them is
no longer there, so an upgrade shows here first, never as a silently slower
path. What amqpkit relies on:

- ``Connection.HEARTBEAT_GRACE_MULTIPLIER`` (a class attribute): how many
  heartbeat intervals of silence aiormq waits before it calls a link dead.
- ``Channel.basic_publish(..., wait=False)``: hand the frames to the writer
  and return without waiting for the write (aiormq's ``AbstractChannel``
  does not declare ``wait``; its ``Channel`` has it).
- ``Channel.basic_publish``'s own steps, for a publish nothing can hold up
  (no confirms, the name-mangled ``Channel.__lock`` free and unawaited, room
  in the write queue): :func:`publish_nowait` queues the frames itself, as
  ``basic_publish`` would, with ``aiormq.channel._check_routing_key``,
  ``Channel._split_body``, ``ChannelFrame.marshall`` and
  ``Channel.delivery_tag``; anything else goes through ``basic_publish``.
- ``Channel._on_return_frame``, ``Channel._read_content`` and the
  name-mangled ``Channel.__get_content_header``: how a channel reads a
  ``basic.return``. aiormq only matches returns to publisher confirms; on a
  channel without confirms it logs and drops them. :func:`hook_returns`
  replaces that handler on one channel so that a returned message reaches
  its sender without a confirm round trip per message (the RPC fast path).
- ``Channel._on_deliver_frame`` (with the same two readers): how a channel
  reads a ``basic.deliver``. aiormq runs every consumer callback in a task
  of its own; :func:`hook_deliveries` reads one consumer's deliveries in
  the channel's reader and hands them to a plain function instead (direct
  replies to RPC calls: no task, no coroutine per reply).
- The name-mangled ``Channel.__close_event`` (an instance's ``asyncio.Event``):
  set as soon as the broker's ``channel.close`` is read, while ``is_closed``
  turns true only later. A frame sent on the channel in between reaches the
  broker after the ``close-ok`` and makes it close the whole connection
  (504 CHANNEL_ERROR); :func:`closing` tells the two apart.
- ``Connection.write_queue`` (the bounded queue of marshalled frames its
  writer sends; aiormq makes it ``FRAME_BUFFER_SIZE`` long, amqpkit's
  :data:`WRITE_QUEUE_SIZE`) and ``Connection.channels`` (by
  number). ``basic_publish`` waits for room in that queue while holding its
  channel's lock and checks nothing once it has room: publishes that waited
  there while the broker closed the channel were written after the
  ``close-ok``, and the broker closed the connection. :class:`AmqpConnection`
  gives its queue a gate that refuses a ``basic.publish`` for a channel that
  is closing or gone (the publish fails as on a closed channel, and is not
  counted as sent).
- ``Connection.close`` with a ``CancelledError`` instance (not the class, its default) and
  ``Connection.is_connection_was_stuck``: how aiormq ends a connection whose heartbeat found the link
  silent (it cancels its reader, then closes with what that raised). :class:`AmqpConnection` closes it
  with an ``AMQPConnectionError`` instead, so that the calls in flight end as a lost connection.
- ``Connection._rpc`` (a static method the handshake in ``Connection.connect``
  calls for each step, reading the answer with ``frame_receiver.get_frame``):
  aiormq raises ``InvalidFrameError`` when the broker answers a step with
  ``connection.close``, without its reason. :class:`AmqpConnection` wraps
  it and raises :class:`ClosedOnOpen` with the reply code and text (a vhost
  refused, a limit on connections reached).
- The name-mangled ``Connection.__handle_connection_blocked`` and
  ``__handle_connection_unblocked`` (coroutines its reader awaits for
  ``connection.blocked`` and ``connection.unblocked``) and
  ``Connection.__connection_unblocked`` (the event they clear and set).
  aiormq only logs a block; :class:`AmqpConnection` also keeps its reason
  and tells a callback, so that amqpkit can say why nothing is confirmed
  and stop writing RPC requests the broker would run after their callers
  gave up.
- ``Channel._on_return_frame`` on a channel with publisher confirms: it
  sets the outcome of the publish's confirmation future without checking
  that it is still pending. A mandatory publish whose deadline cancelled
  that future in the same loop turn that read its ``basic.return`` made it
  raise ``InvalidStateError``, which ended the channel's reader: the
  channel took no more frames, its close waited for an answer only that
  reader could read, and after 10 s aiormq sent a second ``channel.close``
  on a number the broker had freed, which closed the whole connection (504
  CHANNEL_ERROR). :class:`AmqpConnection` wraps it on every channel it opens
  (:func:`guard_returns`). The name-mangled ``Channel.__reader_task`` is how
  :func:`closing` tells a channel whose reader ended anyway.
- aiormq's writer (``Connection.__writer`` through ``FrameGenerator``) takes
  one item at a time from that queue with ``get`` and writes it to the
  socket, and the stdlib queue keeps its items in a deque, ``_queue``. The
  gated queue's ``get_nowait`` hands the writer every plain frame already
  waiting (none whose writing is awaited, no connection close) as one item:
  one socket write for what was queued together, instead of one each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from random import getrandbits
from typing import Any, cast
from uuid import UUID

import aiormq
from aiormq.abc import AbstractChannel, ChannelFrame, DeliveredMessage
from aiormq.channel import _check_routing_key
from pamqp.commands import Basic, Connection
from pamqp.header import ContentHeader

from .message import ENCODER_REFUSALS, explain_refusal

__all__ = [
    "AmqpConnection",
    "ClosedOnOpen",
    "closed_on_open",
    "closing",
    "deliveries_hookable",
    "guard_returns",
    "hook_deliveries",
    "hook_returns",
    "publish_nowait",
    "returns_hookable",
]

log = logging.getLogger("amqpkit.aiormq_compat")


class AmqpConnection(aiormq.Connection):
    """aiormq's connection, calling a silent link dead as RabbitMQ does."""

    # aiormq waits 3 * (heartbeat + 1) s before it calls a silent link dead.
    # RabbitMQ itself gives up after two missed heartbeats; so do we.
    HEARTBEAT_GRACE_MULTIPLIER = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_queue = _WriteQueue(self, WRITE_QUEUE_SIZE)
        #: Why the broker blocked this connection (its ``connection.blocked`` reason, e.g. "low on memory"),
        #: or None while it is not blocked. The broker reads nothing more from a blocked connection.
        self.blocked: str | None = None
        self.unblocked = asyncio.Event()
        self.unblocked.set()
        #: Called with the reason when the broker blocks the connection, and with None when it unblocks it.
        self.on_blocked: Callable[[str | None], None] | None = None

    async def close(self, exc: Any = asyncio.CancelledError, timeout: Any = None) -> None:
        """aiormq's close; a link its heartbeat found silent ends the calls in flight as a lost connection.

        aiormq ends such a connection by cancelling its reader and closes it with that ``CancelledError``
        (an instance: a close asked for passes the class), which every call waiting on the broker then
        raised, in tasks nobody had cancelled: a confirmed publish was not sent again after the reconnect.
        """
        if isinstance(exc, asyncio.CancelledError):
            if self.is_connection_was_stuck:
                why = f"the broker sent nothing for {self.heartbeat_timeout + 1} s (heartbeat): the link is silent"
            else:
                why = "the connection's reader stopped"
            exc = aiormq.exceptions.AMQPConnectionError(why)
        await super().close(exc, timeout)

    async def channel(self, *args: Any, **kwargs: Any) -> AbstractChannel:
        channel = await super().channel(*args, **kwargs)
        guard_returns(channel)
        return channel

    # Replace aiormq's two handlers (its reader awaits them by their mangled names): the same event, kept
    # reason, no log line of aiormq's (the Broker says it once, in its own words).
    async def _Connection__handle_connection_blocked(self, frame: Connection.Blocked) -> None:
        self._set_blocked(frame.reason or "no reason given")

    async def _Connection__handle_connection_unblocked(self, frame: Connection.Unblocked) -> None:
        self._set_blocked(None)

    def _set_blocked(self, reason: str | None) -> None:
        event = cast(asyncio.Event, getattr(self, _UNBLOCKED))  # aiormq's own: its writer waits on it
        if reason is None:
            event.set()
            self.unblocked.set()
        else:
            event.clear()
            self.unblocked.clear()
        changed = (reason is None) != (self.blocked is None)
        self.blocked = reason
        if changed and self.on_blocked is not None:
            self.on_blocked(reason)

    @staticmethod
    async def _rpc(request: Any, writer: Any, frame_receiver: Any, wait_response: bool = True) -> Any:
        """aiormq's handshake step, keeping the broker's reason when it answers with a close where aiormq
        expected another frame (a vhost it refuses, a limit on connections): :class:`ClosedOnOpen`."""
        watched = _LastFrame(frame_receiver)
        try:
            return await aiormq.Connection._rpc(request, writer, cast(Any, watched), wait_response)
        except aiormq.exceptions.InvalidFrameError as exc:
            if isinstance(watched.last, Connection.Close):
                raise ClosedOnOpen(watched.last.reply_code or 0, watched.last.reply_text or "") from exc
            raise


_UNBLOCKED = "_Connection__connection_unblocked"  # aiormq.Connection.__connection_unblocked, name-mangled


class ClosedOnOpen(aiormq.exceptions.InvalidFrameError):
    """The broker answered the handshake with connection.close: ``reply_code`` and ``reply_text`` say why."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"the broker closed the connection while it opened: {reply_code} {reply_text}")
        self.reply_code = reply_code
        self.reply_text = reply_text


class _LastFrame:
    """A handshake's frame receiver that remembers the last frame it handed out."""

    __slots__ = ("_receiver", "last")

    def __init__(self, receiver: Any) -> None:
        self._receiver = receiver
        self.last: Any = None

    async def get_frame(self) -> Any:
        received = await self._receiver.get_frame()
        self.last = received[2]
        return received


# A method frame (type 1) of class 60 (basic), method 40 (publish): bytes 7-10 after type and channel and size.
_PUBLISH_METHOD = (60).to_bytes(2, "big") + (40).to_bytes(2, "big")


WRITE_QUEUE_SIZE = 256
"""Items (a publish's frames are one) the connection's write queue holds before a publish waits for room.

aiormq's own is ``FRAME_BUFFER_SIZE`` (10). A publish that finds the queue full waits for room while holding its
channel's lock, so the publishes behind it on that channel go one per turn of the event loop, each written on
its own. With room for them, publishes started together (confirms arriving in a batch resume many publishers
at once) are queued in one turn and written together. The queue never bounded memory: aiormq's writer moves
each item on to the socket's buffer without waiting for it to drain. One-way at c=64 on the 2-CPU VM: 4,122
against 2,433 confirmed messages a second (medians of 9, same run; patterns/observability.md, Cost).
"""

COALESCE_BYTES = 128 * 1024
"""At most this many bytes of queued frames are handed to the writer as one item (one socket write)."""


class _WriteQueue(asyncio.Queue[Any]):
    """aiormq's write queue, refusing a publish for a channel that is closing or gone, and handing the writer
    every frame already waiting as one write (see the module's notes)."""

    def __init__(self, connection: aiormq.Connection, maxsize: int) -> None:
        super().__init__(maxsize)
        self._connection = connection

    def get_nowait(self) -> Any:  # asyncio.Queue.get ends here too, once an item has come
        """The next item; when it and the items after it are plain frames (no drain to report, no close), all
        of them that are waiting, up to :data:`COALESCE_BYTES`, joined into one.

        aiormq's writer writes each item to the socket as it takes it: with the socket keeping up, a send
        system call per message. Messages queued in one turn of the event loop (64 confirmed publishes resumed
        by one batch of confirms, say) then cost 64 calls where one would do; py-spy put the writes at
        50-90 µs a message in a publishing process at full speed. Joined, they go in order, each channel's
        frames still whole, and nothing waits for them that did not before: only what is already queued is
        joined.
        """
        item = super().get_nowait()
        waiting = self._queue  # type: ignore[attr-defined]  # asyncio.Queue's deque: only looked at, never changed
        if not waiting or not _plain(item) or not _plain(waiting[0]):
            return item
        payloads, size = [item.payload], len(item.payload)
        while waiting and _plain(waiting[0]) and size + len(waiting[0].payload) <= COALESCE_BYTES:
            joined = super().get_nowait()  # each one taken as get takes it: a waiting putter is woken for each
            self.task_done()  # the writer marks the one item it gets as done; the joined ones are done here
            payloads.append(joined.payload)
            size += len(joined.payload)
        if len(payloads) == 1:
            return item
        return ChannelFrame(payload=b"".join(payloads), should_close=False)

    def put_nowait(self, item: Any) -> None:  # asyncio.Queue.put ends here too, once it has room
        payload = getattr(item, "payload", b"")
        if payload[:1] == b"\x01" and payload[7:11] == _PUBLISH_METHOD:
            number = int.from_bytes(payload[1:3], "big")
            channel = self._connection.channels.get(number)
            if channel is None or closing(channel):
                raise aiormq.exceptions.ChannelInvalidStateError(f"channel {number} is closing: publish not sent")
        elif self.full():
            # Not a publish: aiormq queues a channel's close-ok with put_nowait and drops it if the queue is
            # full (the broker then holds the channel half-closed). Such frames are small: room is made.
            bound, self._maxsize = self._maxsize, 0  # type: ignore[has-type]  # asyncio.Queue's own bound
            try:
                super().put_nowait(item)
            finally:
                self._maxsize = bound
            return
        super().put_nowait(item)


def _plain(item: Any) -> bool:
    """Whether ``item`` is a ChannelFrame whose writing nothing waits for and after which nothing must stop."""
    return type(item) is ChannelFrame and not item.should_close and item.drain_future is None


async def publish_nowait(
    channel: AbstractChannel,
    body: bytes,
    *,
    exchange: str = "",
    routing_key: str = "",
    properties: Basic.Properties | None = None,
    mandatory: bool = False,
    timeout: float | None = None,
) -> None:
    """Publish without waiting for the frames to be written; ``timeout`` bounds the wait for room to queue them.

    Raises :class:`~amqpkit.InvalidMessage` when the message cannot be encoded (nothing was queued)."""
    try:
        if _queue_at_once(channel, body, exchange, routing_key, properties, mandatory):
            return
        await channel.basic_publish(  # type: ignore[call-arg]  # aiormq's abc lags its Channel
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
            wait=False,
            timeout=timeout,
        )
    except ENCODER_REFUSALS:
        explain_refusal(properties, routing_key)
        raise


_LOCK = "_Channel__lock"  # aiormq.Channel.__lock, name-mangled: held by a publish while it queues its frames


def _queue_at_once(
    channel: AbstractChannel,
    body: bytes,
    exchange: str,
    routing_key: str,
    properties: Basic.Properties | None,
    mandatory: bool,
) -> bool:
    """Queue a publish's frames now when nothing could make it wait; False, with nothing done, when something could.

    aiormq's ``basic_publish`` enters two context managers and a timeout and
    takes the channel's lock to queue the frames. Without publisher confirms,
    with that lock free and nobody waiting for it, and with room in the write
    queue, none of that can wait, and it was about 50 of the 756 calls an RPC
    server made between reading a request and writing its reply. What it does
    besides is done here the same way: the routing key checked, a random
    message id when there is none, the frames marshalled as one item (so no
    other publish on the channel interleaves), the delivery tag counted. The
    write queue's gate still refuses a publish on a channel that is closing.
    """
    lock = getattr(channel, _LOCK, None)
    if (
        not isinstance(lock, asyncio.Lock)
        or lock.locked()
        or lock._waiters  # one queued for the lock goes first, as asyncio.Lock has it
        or channel.publisher_confirms  # type: ignore[attr-defined]
        or channel.is_closed
    ):
        return False
    queue = channel.write_queue  # type: ignore[attr-defined]  # the connection's, as aiormq's Channel holds it
    if queue.full():
        return False
    _check_routing_key(routing_key)
    if properties is None:
        properties = Basic.Properties(delivery_mode=1)
    if not properties.message_id:
        properties.message_id = UUID(int=getrandbits(128), version=4).hex
    frames: list[Any] = [
        Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(properties=properties, body_size=len(body)),
    ]
    frames += channel._split_body(body)  # type: ignore[attr-defined]
    queue.put_nowait(ChannelFrame.marshall(channel_number=channel.number, frames=frames))
    channel.delivery_tag += 1  # type: ignore[attr-defined]
    return True


_READ_HEADER = "_Channel__get_content_header"  # aiormq.Channel.__get_content_header, name-mangled


def returns_hookable(channel: AbstractChannel) -> bool:
    """Whether ``channel`` has the internals :func:`hook_returns` replaces (aiormq as pinned: always)."""
    return all(hasattr(channel, name) for name in (_READ_HEADER, "_read_content", "_on_return_frame"))


def hook_returns(channel: AbstractChannel, callback: Callable[[DeliveredMessage], None]) -> bool:
    """Route ``basic.return`` on ``channel`` (one without publisher confirms) to ``callback``.

    Returns False, and changes nothing, if aiormq's internals are not as
    expected: the caller then falls back to a channel with confirms (slower:
    a confirm frame per message), and ``tests/test_aiormq_compat.py`` fails.
    """
    if not returns_hookable(channel):
        return False
    read_header = getattr(channel, _READ_HEADER)
    read_content = channel._read_content  # type: ignore[attr-defined]

    async def on_return(frame: Any) -> None:
        header = await read_header()
        callback(await read_content(frame, header))

    try:
        channel._on_return_frame = on_return  # type: ignore[attr-defined]
    except AttributeError:
        return False
    return True


def deliveries_hookable(channel: AbstractChannel) -> bool:
    """Whether ``channel`` has the internals :func:`hook_deliveries` replaces (aiormq as pinned: always)."""
    return all(hasattr(channel, name) for name in (_READ_HEADER, "_read_content", "_on_deliver_frame"))


def hook_deliveries(channel: AbstractChannel, consumer_tag: str, callback: Callable[[DeliveredMessage], None]) -> bool:
    """Hand ``consumer_tag``'s deliveries on ``channel`` to ``callback``, called in the channel's reader.

    ``callback`` must be quick and must not block: the channel reads nothing
    else while it runs. An exception it raises is logged, not raised into the
    reader. Other consumers of the channel are served as before. Returns
    False, and changes nothing, if aiormq's internals are not as expected
    (the consumer then keeps aiormq's task per delivery).
    """
    if not deliveries_hookable(channel):
        return False
    read_header = getattr(channel, _READ_HEADER)
    read_content = channel._read_content  # type: ignore[attr-defined]
    others = channel._on_deliver_frame  # type: ignore[attr-defined]

    async def on_deliver(frame: Basic.Deliver) -> None:
        if frame.consumer_tag != consumer_tag:
            await others(frame)
            return
        message = await read_content(frame, await read_header())
        try:
            callback(message)
        except Exception:
            log.exception("a delivery callback failed on consumer %s", consumer_tag)

    try:
        channel._on_deliver_frame = on_deliver  # type: ignore[attr-defined]
    except AttributeError:
        return False
    return True


_CLOSE_EVENT = "_Channel__close_event"  # aiormq.Channel.__close_event, name-mangled


def closing(channel: AbstractChannel) -> bool:
    """``channel`` is closed, or the broker has closed it and aiormq has not said so yet, or its reader has ended
    (it reads no confirm or answer any more): send nothing on it."""
    if channel.is_closed:
        return True
    event = getattr(channel, _CLOSE_EVENT, None)
    if event is not None and event.is_set():
        return True
    reader = getattr(channel, _READER_TASK, None)
    return reader is not None and reader.done()


_READER_TASK = "_Channel__reader_task"  # aiormq.Channel.__reader_task, name-mangled


def guard_returns(channel: AbstractChannel) -> None:
    """Keep ``channel``'s reader alive when a ``basic.return`` comes for a publish whose confirmation future
    is already done (cancelled by the publish's deadline in the same loop turn): aiormq has read the message
    and noted the return by then, and only setting that future fails. See the module's notes."""
    original = getattr(channel, "_on_return_frame", None)
    if original is None:
        return

    async def on_return(frame: Any) -> None:
        try:
            await original(frame)
        except asyncio.InvalidStateError:
            log.debug("a returned message's publish had already ended (its deadline passed)")

    channel._on_return_frame = on_return  # type: ignore[attr-defined]


def closed_on_open(exc: BaseException) -> bool:
    """The broker answered connection.open with connection.close (its reason, when read: :class:`ClosedOnOpen`).

    aiormq reports it as an ``InvalidFrameError`` whose text names both frames.
    """
    if isinstance(exc, ClosedOnOpen):
        return True
    if not isinstance(exc, aiormq.exceptions.InvalidFrameError):
        return False
    text = str(exc)
    return "Connection.OpenOk" in text and "Connection.Close" in text
