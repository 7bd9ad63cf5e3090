"""Where a stream's consumer got to, so that a re-attach resumes there (consuming.py asks at each attach).

A stream keeps its messages, and ``x-stream-offset`` says where a consumer
starts reading. Re-attached with the argument given to ``consume()``, a
consumer would read again from ``"first"`` (or a number) everything it had
read, and from ``"next"`` (or ``"last"``, or a timestamp) never get what was
appended while it was detached. So the Broker notes the offset of each
delivery (the ``x-stream-offset`` header) and its settlement, and a re-attach
(after a reconnect, a broker's cancel, a lost channel, a wait for a channel
or for access) asks for the lowest offset delivered to the callback and not
yet settled, else the last one settled + 1: at least once, as with any queue.
The broker starts exactly there: RabbitMQ 3.10 and 4.0 leave out the messages
of the chunk before a numeric offset (measured: from 47, 47 first, in a chunk
of 45 to 49 on 3.10 and of 33 to 49 on 4.0). A consumer of a stream acks:
``consume()`` refuses ``auto_ack`` for one (:func:`refuse_auto_ack`).

Unless retention removed it meanwhile: a stream with ``x-max-length-bytes``
or ``x-max-age`` drops its oldest segments whole, and an attach at an offset
in one of them starts at the first offset the stream still has (measured: 5
asked, 436 first delivered, on 3.10 and 4.0, after 400 messages of 500 bytes
appended to a stream keeping 20 kB in segments of 5 kB). What lay between is
never delivered. Nothing can bring it back, but the first delivery of a
resumed attach tells: past the offset asked for by more than one, a WARNING
says how many offsets were skipped, and ``Consumer.skipped_offsets`` counts
them. A gap of one is no loss: each segment but the first begins with an
entry of the broker's own, which takes an offset and is not delivered
(measured: a stream read from its first message misses offset 7, then every
eighth, in segments of 5 kB, on 3.10 and 4.0); the count includes such
entries. Nor is a gap with an ``x-stream-filter``, which leaves out what does
not match.

Retention also overtakes a consumer that stays attached but reads slower
than the stream is written (an operator's ``max-length-bytes`` or
``max-age`` policy set for every stream of a vhost, say): the broker removes
the segments ahead of it and goes on at the first offset still there
(measured: offsets 95 to 1769 skipped in one attach, on 4.0.5; the same on
3.10). Each delivery more than one offset past the one before it in the same
attach is said in a WARNING and counted in ``Consumer.skipped_offsets`` the
same way, but for a consumer with a filter.

A stream deleted and declared again by the Broker is a new stream, whose
offsets start at 0 again; attached at an old offset, the consumer waits for
that many new messages and never gets them (measured before this was
handled: resumed at 20, 5 of 25 new messages delivered, on 3.10 and 4.0). Everything in the new stream came
after what the consumer read of the old one, so it is read from its first
message (offset 0): neither where the consumer got to nor the argument given
to ``consume()`` (a stored number means nothing in the new stream; ``"next"``
would miss what came between the declare and the attach) applies. The Broker
asks whether the stream is still there, with a passive declare (404: gone),
before it declares it again: when the broker cancels the consumer
(Consuming._on_broker_cancel), and at a reconnect, for each stream a consumer
reads, before the topology is declared again (Consuming._streams_gone: one
round trip per stream, at a reconnect only). A WARNING names the consumer,
the stream and the offset it had got to.

Before anything was delivered, the argument given to ``consume()`` stands
(but in a stream found new, above).
For ``"next"`` that leaves a gap: an outage before the first delivery loses
what was appended during it, since where ``"next"`` pointed when the consumer
attached is nowhere to be read over AMQP 0-9-1. Guessing a timestamp for it
instead would hang on the client's and the broker's clocks agreeing (to the
second, the resolution AMQP gives), and hand over messages written before the
consumer attached, which ``"next"`` said it did not want, or still miss some
with the clocks apart: a choice the library should not make silently. A
consumer that must not miss anything starts from a stored offset,
``"first"`` or a timestamp, which a re-attach before the first delivery
repeats safely (nothing was appended since, or it would have come).

Not handled: a stream deleted and declared again by someone else while the
connection is down (or between the Broker's passive declare and its declare,
or between the broker's cancel and that question) is still there when asked,
and over AMQP 0-9-1 nothing tells it from the old one: declare-ok counts 0
messages for a stream (3.10 and 4.0, with 5 in it), and an attach at an
offset past its end waits instead of failing. It is read from where the old
one was left, and that many of its first messages are skipped
(RELIABILITY.md). So is a stream the Broker does not declare
(``consume(..., declare=False)``) that its owner deletes and declares again
during an outage: the reconnect does not ask about it.

RabbitMQ 3.10 answers a basic.nack or basic.reject of a stream's delivery by
closing the whole connection (540 NOT_IMPLEMENTED); 4.0.5 takes them, and a
stream neither requeues nor dead-letters, so they do there what an ack does:
let the prefetch move on. On a broker before 4.0 (and one whose version is
not known; the releases between 3.10 and 4.0 were not measured) a stream
delivery's nack or reject is written as a basic.ack, said once per consumer
at DEBUG, and the delivery's ``settled`` says what its reader asked for.

Per delivery, this costs only consumers of a stream (an ``x-stream-offset``
argument, or a queue declared as a stream); the others do no work of it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiormq.abc import AbstractChannel, DeliveredMessage

from .message import Delivery, Settlement, _Settler, delivery_from_aiormq
from .topology import Queue, QueueType

OFFSET = "x-stream-offset"
FILTER = "x-stream-filter"


def is_stream(queue: Queue) -> bool:
    """Whether ``queue`` is declared as a stream (its type, or an ``x-queue-type`` argument)."""
    return queue.type is QueueType.STREAM or queue.arguments.get("x-queue-type") == "stream"


def reads_stream(queue: Queue, arguments: Mapping[str, Any]) -> bool:
    """Whether a consumer with these ``arguments`` reads a stream (where it got to is then worth noting)."""
    return OFFSET in arguments or is_stream(queue)


NACKS_TAKEN = (4, 0)
"""The first RabbitMQ version known to take a nack or reject of a stream's delivery: one before it (or whose
version is not known) closes the connection at one, so an ack is written instead (an ack does there what they
would do)."""


def refuse_auto_ack(queue: Queue, arguments: Mapping[str, Any], auto_ack: bool) -> None:
    """Raise ValueError for an auto-ack consumer of a stream: RabbitMQ answers its basic.consume by closing the
    whole connection (540 NOT_IMPLEMENTED, on 3.10 and 4.0.5), every other consumer and publish of it with it."""
    if auto_ack and reads_stream(queue, arguments):
        raise ValueError(
            f"queue {queue.name!r} is a stream, which RabbitMQ delivers only to a consumer that acks (auto_ack=False, "
            "with a prefetch): it closes the whole connection at an auto-ack consume of one (540 NOT_IMPLEMENTED)"
        )


def offset_of(message: DeliveredMessage) -> int | None:
    """The ``x-stream-offset`` a stream delivery carries, or None."""
    headers = message.header.properties.headers
    value = headers.get(OFFSET) if headers else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class StreamRead:
    """What one attach of a stream's consumer delivered: offsets handed over and not settled, the next one."""

    __slots__ = ("jumped", "last", "nack_as_ack", "next", "skipped", "start", "unsettled")

    def __init__(self, at: int | None) -> None:
        self.start = at  # the offset this attach asked for; None: the consumer's own argument
        self.next = at  # the last offset settled + 1 (or where it started)
        self.unsettled: set[int] = set()
        # told (the offset asked for, the first one delivered) when the first delivery of an attach that asked for
        # an offset comes more than one past it: retention removed what lay between; None once the first came
        self.skipped: Callable[[int, int], None] | None = None
        # told (the offset delivered before, the one delivered now) when a later delivery of the attach comes more
        # than one offset past the one before it: retention overtook the consumer (None: not watched, a filter)
        self.jumped: Callable[[int, int], None] | None = None
        self.last: int | None = None  # the highest offset this attach delivered
        # set for a broker that closes the connection at a nack or reject of a stream's delivery: they are written
        # as an ack, and this is told the outcome asked for
        self.nack_as_ack: Callable[[Settlement], None] | None = None

    def resume_at(self) -> int | None:
        """Where the next attach starts: the lowest offset handed over and unsettled, else the next one."""
        return min(self.unsettled) if self.unsettled else self.next

    def settled(self, offset: int) -> None:
        self.unsettled.discard(offset)
        if self.next is None or offset >= self.next:
            self.next = offset + 1

    def delivery(self, message: DeliveredMessage, *, auto_ack: bool) -> Delivery[bytes]:
        """The delivery handed to the callback, its offset noted; its settlement is noted too."""
        delivery = delivery_from_aiormq(message, auto_ack=auto_ack)
        offset = offset_of(message)
        if offset is not None:
            if self.skipped is not None:
                skipped, self.skipped = self.skipped, None
                if self.start is not None and offset > self.start + 1:
                    skipped(self.start, offset)
            last = self.last
            if last is None or offset > last:
                if last is not None and offset > last + 2 and self.jumped is not None:
                    self.jumped(last, offset)
                self.last = offset
            if auto_ack:
                self.settled(offset)  # settled as it is handed over
            else:
                self.unsettled.add(offset)
                plain = delivery._settler
                delivery._settler = _NotedSettler(plain.channel, plain.tag, self, offset)
        return delivery


class _NotedSettler(_Settler):
    """A stream delivery's settle-once state, which tells its :class:`StreamRead` once the settlement is written."""

    __slots__ = ("offset", "read")

    def __init__(self, channel: AbstractChannel | None, tag: int, read: StreamRead, offset: int) -> None:
        super().__init__(channel, tag, auto_ack=False)
        self.read = read
        self.offset = offset

    async def settle(self, outcome: Settlement, write: Callable[[AbstractChannel], Awaitable[None]]) -> None:
        told = self.read.nack_as_ack if outcome is not Settlement.ACKED else None
        if told is not None:
            tag = self.tag

            async def write(channel: AbstractChannel) -> None:  # an ack, what the broker takes
                await channel.basic_ack(tag, wait=False)

        await super().settle(outcome, write)  # a write that fails leaves it unsettled: resumed from
        self.read.settled(self.offset)
        if told is not None:
            told(outcome)


class StreamPosition:
    """Where a stream's consumer got to, across its attaches."""

    __slots__ = ("_read", "said_nack_as_ack")

    def __init__(self) -> None:
        self._read = StreamRead(None)
        self.said_nack_as_ack = False  # a nack written as an ack was said (once per consumer)

    def attach(self, arguments: dict[str, Any]) -> tuple[dict[str, Any], StreamRead]:
        """The arguments of the next attach, and the record of what it delivers. Nothing delivered yet: the
        consumer's own arguments. Asked again before anything came (an attach that failed), the same answer."""
        at = self._read.resume_at()
        if at is None:
            return arguments, self._read
        self._read = StreamRead(at)
        return {**arguments, OFFSET: at}, self._read

    def new_stream(self) -> int | None:
        """The stream was deleted and is declared again: a new one, whose offsets start at 0, read from there (its
        first message) rather than from where the old one was left. Returns where that was (None: nothing
        delivered yet)."""
        had = self._read.resume_at()
        self._read = StreamRead(0)
        return had
