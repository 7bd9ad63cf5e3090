"""What is sent (:class:`Envelope`) and what arrives (:class:`Delivery`)."""

from __future__ import annotations

import logging
import math
import os
import struct
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import aiormq.exceptions
from pamqp import encode
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from .errors import InvalidMessage, SettlementError, map_exceptions
from .unreadable import (
    LENIENT_METHODS,
    NOTHING_UNREADABLE,
    UNREADABLE_HEADER,
    UnreadableProperties,
    unreadable_of,
    with_unreadable,
)

if TYPE_CHECKING:
    from aiormq.abc import AbstractChannel, DeliveredMessage

__all__ = ["Delivery", "Envelope", "MessageProperties", "Settlement"]

log = logging.getLogger("amqpkit.message")

T = TypeVar("T")
U = TypeVar("U")


def new_message_id() -> str:
    """A random 128-bit id in hex (as unique as a uuid4, at a quarter of the cost)."""
    return os.urandom(16).hex()


class MessageProperties(Protocol):
    """A message's AMQP basic properties as they travel (AMQP 0-9-1 names; ``expiration`` in ms, as text).

    What :meth:`Envelope.properties` returns and :class:`Delivery` is built
    from; :class:`Envelope` is the friendlier form of the same thing.
    """

    content_type: str | None
    content_encoding: str | None
    headers: dict[str, Any] | None
    delivery_mode: int | None
    priority: int | None
    correlation_id: str | None
    reply_to: str | None
    expiration: str | None
    message_id: str | None
    timestamp: datetime | None
    message_type: str | None
    user_id: str | None
    app_id: str | None


@dataclass(slots=True)
class Envelope:
    """A message body with its AMQP properties.

    ``expiration`` is in seconds (the broker's per-message TTL); ``persistent``
    maps to delivery mode 2. ``message_id`` defaults to a fresh uuid. A float in
    ``headers`` is sent as AMQP's 64-bit double, so it arrives as it was; NaN and
    the infinities are refused (:class:`InvalidMessage`): RabbitMQ closes the
    connection over them.
    """

    body: bytes
    content_type: str | None = None
    content_encoding: str | None = None
    message_id: str | None = field(default_factory=new_message_id)
    correlation_id: str | None = None
    reply_to: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    timestamp: datetime | None = None
    type: str | None = None
    expiration: float | None = None
    persistent: bool = True
    priority: int | None = None
    app_id: str | None = None

    def properties(self) -> MessageProperties:
        """The AMQP properties this envelope is sent with."""
        return basic_properties(self)

    @classmethod
    def from_properties(cls, body: bytes, props: MessageProperties) -> Envelope:
        """An envelope with ``body`` and the properties ``props`` (as a delivery carries them).

        What could not be read of them (another client's: see :mod:`amqpkit.unreadable`) goes in the header
        ``x-unreadable-properties``, as bytes, so that a copy sent on loses none of it."""
        expiration: float | None = None
        if props.expiration:
            try:
                expiration = int(props.expiration) / 1000
            except ValueError:
                expiration = None
        headers = fit_received_headers(dict(props.headers)) if props.headers else {}
        _keep_unreadable(props, headers)
        return cls(
            body=body,
            content_type=props.content_type,
            content_encoding=props.content_encoding,
            message_id=props.message_id,
            correlation_id=props.correlation_id,
            reply_to=props.reply_to,
            headers=headers,
            timestamp=props.timestamp.replace(tzinfo=UTC) if props.timestamp else None,
            type=props.message_type,
            expiration=expiration,
            persistent=props.delivery_mode == 2,
            priority=props.priority,
            app_id=props.app_id,
        )


def _keep_unreadable(props: MessageProperties, headers: dict[str, Any]) -> None:
    unreadable = unreadable_of(props)
    if unreadable:
        headers[UNREADABLE_HEADER] = {name: bytearray(raw) for name, raw in unreadable.items()}


def basic_properties(envelope: Envelope) -> Basic.Properties:
    """The envelope's properties as the frame carries them (pamqp's type; for the publish paths).

    Raises :class:`InvalidMessage` for an expiration that is not a finite number of seconds and for a header
    name AMQP cannot carry (which pamqp would cut short, with only a log line); :func:`unsendable` says what else
    keeps a message from being encoded, once the encoder has refused it.
    """
    headers = envelope.headers
    if headers:
        check_header_names(headers)
        headers = as_doubles(headers)
    return Basic.Properties(
        content_type=envelope.content_type,
        content_encoding=envelope.content_encoding,
        headers=headers or None,
        delivery_mode=2 if envelope.persistent else 1,
        priority=envelope.priority,
        correlation_id=envelope.correlation_id,
        reply_to=envelope.reply_to,
        expiration=None if envelope.expiration is None else _expiration_ms(envelope.expiration),
        message_id=envelope.message_id,
        timestamp=envelope.timestamp,
        message_type=envelope.type,
        app_id=envelope.app_id,
    )


def _expiration_ms(seconds: float) -> str:
    try:
        return str(max(0, round(seconds * 1000)))
    except (TypeError, ValueError, OverflowError):
        raise InvalidMessage(f"expiration must be a finite number of seconds, got {seconds!r}") from None


HEADER_NAME_LIMIT = 128
"""The longest header (field table) name AMQP carries, in UTF-8 bytes."""


class _Double(float):
    """A header's float as amqpkit sends it: AMQP's 64-bit double (``d``). pamqp sends every float as a 32-bit
    ``f``: 19.99 arrived as 19.989999771118164, and 1e300 could not be sent at all."""

    __slots__ = ()


_DOUBLE = struct.Struct(">d")
# pamqp's own encoder, also when this module is loaded again (the wrapper below keeps what it wraps)
_encode_as_pamqp = getattr(encode.encode_table_value, "amqpkit_wraps", encode.encode_table_value)


def _encode_table_value(value: Any) -> bytes:
    """pamqp's encoder for a table's value, but a :class:`_Double` (only amqpkit makes them) goes as ``d``."""
    if type(value) is _Double:
        return b"d" + _DOUBLE.pack(value)
    return _encode_as_pamqp(value)


_first_load = getattr(encode.encode_table_value, "amqpkit_double", None)
if _first_load is None:
    _encode_table_value.amqpkit_double = _Double  # type: ignore[attr-defined]
    _encode_table_value.amqpkit_wraps = _encode_as_pamqp  # type: ignore[attr-defined]
    encode.encode_table_value = _encode_table_value  # pamqp's field_table and field_array call it by this name
else:  # this module loaded again (importlib.reload): the first load's encoder stays, and so does its type,
    _Double = _first_load  # type: ignore[misc]  # or the doubles made from now on would go as pamqp's floats


def as_doubles(headers: dict[str, Any]) -> dict[str, Any]:
    """``headers`` with every float in them, at any depth, sent as a 64-bit double (a copy; ``headers`` itself
    when it holds no float, almost always).

    Raises :class:`InvalidMessage` for a float that is not finite: RabbitMQ cannot read NaN or an infinity in
    a header and closes the whole connection over it (541 INTERNAL_ERROR), and a confirmed publish, sent again
    after each reconnect, would close it again until its deadline."""
    for item in headers.values():
        if type(item) not in _NO_FLOAT_INSIDE:
            break
    else:
        return headers  # the usual case, in one pass without a call per value
    if not _holds_float(headers):
        return headers
    return cast(dict[str, Any], _doubled(headers, "header"))


_NO_FLOAT_INSIDE = frozenset({str, int, bool, type(None), bytes, bytearray, datetime})


def _holds_float(value: Any) -> bool:
    for item in value.values() if isinstance(value, dict) else value:
        if isinstance(item, float) or (isinstance(item, (dict, list)) and _holds_float(item)):
            return True
    return False


def _doubled(value: Any, where: str) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidMessage(f"{where}: RabbitMQ cannot read a float that is not finite (NaN or an infinity)")
        return _Double(value)
    if isinstance(value, dict):
        return {key: _doubled(item, f"{where} {_shown(key)}") for key, item in value.items()}
    if isinstance(value, list):
        return [_doubled(item, where) for item in value]
    return value


def check_header_names(headers: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidMessage` for a header name that is not text or is over :data:`HEADER_NAME_LIMIT`
    bytes, in ``headers`` or in a table nested in them (pamqp would cut it short, logging the name)."""
    for key, value in headers.items():
        # 32 characters are at most 128 bytes in UTF-8: only a longer name is encoded to be measured
        if type(key) is not str or (len(key) > 32 and (_utf8_size(key) or 0) > HEADER_NAME_LIMIT):
            problem = _name_problem(key, "header")
            if problem is not None:
                raise InvalidMessage(problem)
        if isinstance(value, (dict, list)):
            problem = _value_problem(value, f"header {_shown(key)}")
            if problem is not None:
                raise InvalidMessage(problem)


def fit_received_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """``headers`` of a received message as amqpkit can send them again, for copies (a retry, a dead letter, a
    replay), which must not be held up by what their sender chose:

    - a name over :data:`HEADER_NAME_LIMIT` bytes (RabbitMQ carries up to 255) is cut to that many, with a
      warning, as pamqp would cut it;
    - a value pamqp read as ``bytes`` (a long string that is not UTF-8) goes as a byte array: the same bytes,
      which pamqp cannot send as ``bytes``;
    - a float goes as a 64-bit double (:func:`as_doubles`), whether it came as one or as a 32-bit float.

    A message amqpkit's user builds is refused instead (:func:`check_header_names`, :class:`InvalidMessage`).
    ``headers`` itself is returned when nothing needs changing."""
    if _sendable_as_is(headers):
        return headers
    return cast(dict[str, Any], _fitted(headers))


def _sendable_as_is(value: Any) -> bool:
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        # 32 characters are at most 128 bytes in UTF-8: only a longer name is encoded to be measured
        if type(key) is str and len(key) > 32 and (_utf8_size(key) or 0) > HEADER_NAME_LIMIT:
            return False
        if type(item) is bytes or type(item) is float:
            return False
        if isinstance(item, (dict, list)) and not _sendable_as_is(item):
            return False
    return True


def _fitted(value: Any) -> Any:
    if type(value) is bytes:
        return bytearray(value)
    if type(value) is float:
        return _Double(value)  # finite: RabbitMQ carries no other
    if isinstance(value, list):
        return [_fitted(item) for item in value]
    if not isinstance(value, dict):
        return value
    fitted = {}
    for key, item in value.items():
        name = key
        if isinstance(key, str) and (_utf8_size(key) or 0) > HEADER_NAME_LIMIT:
            name = key.encode()[:HEADER_NAME_LIMIT].decode("utf-8", "ignore")
            log.warning("header name %s… cut to %d bytes in a copy of a received message (AMQP field names are "
                        "at most %d bytes)", _shown(key[:40]), len(name.encode()), HEADER_NAME_LIMIT)  # fmt: skip
        fitted[name] = _fitted(item)
    return fitted


def _utf8_size(text: str) -> int | None:
    """``text``'s length in UTF-8 bytes; None when it is not valid text (a lone surrogate)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return None


_SHORT_TEXT = ("content_type", "content_encoding", "correlation_id", "reply_to", "expiration", "message_id",
               "message_type", "user_id", "app_id")  # fmt: skip
_ENVELOPE_NAMES = {"message_type": "type"}


def unsendable(properties: Basic.Properties) -> str | None:
    """What in ``properties`` AMQP cannot carry, in words (naming the property or header, not a header's value);
    None when nothing is found. Asked once an encoder has refused a message, to say why."""
    for attribute in _SHORT_TEXT:
        value = getattr(properties, attribute, None)
        if value is None:
            continue
        name = _ENVELOPE_NAMES.get(attribute, attribute)
        if not isinstance(value, str):
            return f"{name} must be text, got a {type(value).__name__}"
        size = _utf8_size(value)
        if size is None:
            return f"{name} is not valid text (it holds a lone surrogate, which UTF-8 cannot encode)"
        if size > 255:
            return f"{name} is {size} bytes in UTF-8; AMQP carries at most 255"
    for name in ("priority", "delivery_mode"):
        value = getattr(properties, name, None)
        if value is not None and (type(value) is not int or not 0 <= value <= 255):
            return f"{name} must be an integer from 0 to 255, got {value!r}"
    timestamp = properties.timestamp
    if timestamp is not None and not isinstance(timestamp, datetime):
        return f"timestamp must be a datetime, got a {type(timestamp).__name__}"
    headers = properties.headers
    if headers is not None and not isinstance(headers, dict):
        return f"headers must be a dict, got a {type(headers).__name__}"
    return _value_problem(headers, "header") if headers else None


ENCODER_REFUSALS = (TypeError, ValueError, OverflowError, struct.error)
"""What pamqp and aiormq raise for a message they cannot encode (and :func:`explain_refusal` explains)."""


def explain_refusal(properties: Basic.Properties | None, routing_key: str) -> None:
    """Called in an ``except ENCODER_REFUSALS`` block around a publish: raise :class:`InvalidMessage` when
    :func:`unsendable` (or the routing key's length) says why the encoder refused it; return when neither does
    (the failure is something else, for the caller to re-raise as it is). Not chained to the encoder's error,
    whose text may show a header's value."""
    size = _utf8_size(routing_key) if isinstance(routing_key, str) else 0
    if size is None:
        problem: str | None = "routing key is not valid text (it holds a lone surrogate, which UTF-8 cannot encode)"
    elif size > 255:
        problem = f"routing key is {size} bytes in UTF-8; AMQP carries at most 255"
    else:
        problem = unsendable(properties) if properties is not None else None
    if problem is not None:
        raise InvalidMessage(problem) from None


def check_sendable(properties: Basic.Properties) -> None:
    """Raise :class:`InvalidMessage` when AMQP cannot carry ``properties`` as they are: they are encoded here
    once, as a publish would (for a message kept to be sent later, as an outbox row is)."""
    if properties.headers:
        check_header_names(properties.headers)
        properties.headers = as_doubles(properties.headers)
    try:
        ContentHeader(properties=properties, body_size=0).marshal()
    except ENCODER_REFUSALS as exc:
        problem = unsendable(properties)
        raise InvalidMessage(problem or f"the properties cannot be encoded ({type(exc).__name__})") from None


def _shown(name: Any) -> str:
    return repr(name[:60] + "…" if len(name) > 60 else name) if isinstance(name, str) else repr(type(name).__name__)


def _name_problem(key: Any, where: str) -> str | None:
    if not isinstance(key, str):
        return f"{where} names must be text, got a {type(key).__name__}"
    size = _utf8_size(key)
    if size is None:
        return f"{where} name {_shown(key)} is not valid text (it holds a lone surrogate)"
    if size > HEADER_NAME_LIMIT:
        return f"{where} name {_shown(key)} is {size} bytes in UTF-8; AMQP carries at most {HEADER_NAME_LIMIT}"
    return None


def _value_problem(value: Any, where: str) -> str | None:
    """What AMQP cannot carry in a header value (a table's names, a list's items, in depth), or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _name_problem(key, where) or _value_problem(item, f"{where} {_shown(key)}")
            if problem is not None:
                return problem
        return None
    if isinstance(value, list):
        for item in value:
            problem = _value_problem(item, where)
            if problem is not None:
                return problem
        return None
    if isinstance(value, float):
        return None  # sent as a double (as_doubles), which carries every finite float; it refuses the rest
    try:
        encode.encode_table_value(value)
    except (TypeError, ValueError, OverflowError, struct.error):
        if isinstance(value, int):
            kind = "an integer over 64 bits"
        elif isinstance(value, str):
            kind = "text with a lone surrogate (UTF-8 cannot encode it)"
        else:
            kind = f"a value of type {type(value).__name__}"
        return f"{where}: AMQP cannot carry {kind}"
    return None


class Settlement(Enum):
    """How a delivery was settled."""

    ACKED = "acked"
    NACKED = "nacked"
    REQUEUED = "requeued"
    REJECTED = "rejected"
    AUTO = "auto-acked"


CLOSING: weakref.WeakSet[AbstractChannel] = weakref.WeakSet()
"""Channels amqpkit has begun to close (:func:`~amqpkit.channels.close_quietly`): nothing more may be sent on them."""


class _Settler:
    """The one settle-once state shared by a delivery and its decoded copies.

    ``outcome`` is set only once the settlement frame was handed to the
    connection; while it is being written, ``writing`` holds it so that a
    concurrent second settlement is refused. A write that fails leaves the
    delivery unsettled (the broker delivers it again when the channel closes).
    """

    __slots__ = ("channel", "counted", "outcome", "tag", "writing")

    def __init__(self, channel: AbstractChannel | None, tag: int, auto_ack: bool) -> None:
        self.channel = channel
        self.tag = tag
        self.outcome: Settlement | None = Settlement.AUTO if auto_ack else None
        self.writing: Settlement | None = None
        # Told the outcome once it is set: instrumentation's count of a delivery settled after its hand-over.
        self.counted: Callable[[Settlement], None] | None = None

    async def settle(self, outcome: Settlement, write: Callable[[AbstractChannel], Awaitable[None]]) -> None:
        if self.outcome is not None:
            raise SettlementError(f"delivery {self.tag} was already settled ({self.outcome.value})")
        if self.writing is not None:
            raise SettlementError(f"delivery {self.tag} is already being settled ({self.writing.value})")
        if self.channel is None:
            raise SettlementError(f"delivery {self.tag} has no channel to settle on")
        self.writing = outcome
        try:
            if self.channel in CLOSING:  # amqpkit closes it: sent now, the settlement would reach a channel let go of
                raise aiormq.exceptions.ChannelInvalidStateError(f"channel {self.channel.number} is closing")
            await write(self.channel)
        except Exception:
            # Translated here, off the hot path: a context manager entered on every settlement costs.
            with map_exceptions(kind="delivery"):
                raise
        finally:
            self.writing = None
        self.outcome = outcome
        if self.counted is not None:
            self.counted(outcome)


class Delivery(Generic[T]):
    """A message as it arrives: the decoded ``value``, its properties, and how to settle it.

    Settle once: ``ack()``, ``nack(requeue=...)`` or ``reject()``. A second
    settlement raises :class:`~amqpkit.SettlementError`; it is never a no-op.
    Settling on a channel that has since closed raises
    :class:`~amqpkit.ConnectionLost` and leaves the delivery unsettled (the
    broker will deliver the message again). :attr:`settled` reports only a
    settlement that was written.

    The properties are read straight from the frame (``message_id``,
    ``headers``, ``content_type``...); :attr:`envelope` builds the full
    :class:`Envelope` only when asked for.
    """

    __slots__ = ("_envelope", "_properties", "_settler", "body", "exchange", "redelivered", "routing_key", "value")

    def __init__(
        self,
        value: T,
        body: bytes,
        properties: MessageProperties,
        *,
        redelivered: bool = False,
        exchange: str = "",
        routing_key: str = "",
        settler: _Settler | None = None,
    ) -> None:
        self.value = value
        self.body = body
        self._properties = properties
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self._settler = settler or _Settler(None, 0, auto_ack=False)
        self._envelope: Envelope | None = None

    @classmethod
    def from_aiormq(cls, message: Any, *, auto_ack: bool = False) -> Delivery[bytes]:
        """A delivery from an aiormq ``DeliveredMessage`` (``Broker.lowlevel.delivery`` is the seam for patterns)."""
        return delivery_from_aiormq(message, auto_ack=auto_ack)

    def with_value(self, value: U) -> Delivery[U]:
        """The same delivery (sharing its settlement) carrying a decoded value."""
        return Delivery(
            value,
            self.body,
            self._properties,
            redelivered=self.redelivered,
            exchange=self.exchange,
            routing_key=self.routing_key,
            settler=self._settler,
        )

    def forwarded(self, headers: dict[str, Any]) -> Envelope:
        """This message to publish elsewhere: same body and properties (message id included),
        ``headers`` in place of its own, persistent, and no expiration (it must not expire where it goes).
        ``x-delivery-count`` is left out: it is the count a quorum queue keeps of this message's deliveries from
        it, and a copy that carried it would be read as delivered that often where it goes, since RabbitMQ 4.x
        leaves a published one as it is until it counts deliveries there itself.

        What another client sent that amqpkit cannot send again as it came is fitted, so the copy is not held up
        by it (:func:`fit_received_headers`): a header name over 128 bytes is cut to 128, with a warning; a value
        that is not UTF-8 text goes as a byte array holding the same bytes."""
        envelope = Envelope.from_properties(self.body, self._properties)
        envelope.headers = fit_received_headers({k: v for k, v in headers.items() if k != DELIVERY_COUNT})
        _keep_unreadable(self._properties, envelope.headers)
        envelope.persistent = True
        envelope.expiration = None
        return envelope

    @property
    def envelope(self) -> Envelope:
        if self._envelope is None:
            self._envelope = Envelope.from_properties(self.body, self._properties)
        return self._envelope

    @property
    def unreadable(self) -> Mapping[str, bytes]:
        """What another client sent that could not be read: a property's name (or ``"routing_key"``,
        ``"exchange"``, ``"consumer_tag"`` of the frame it came with) -> its bytes; ``"headers"``: the entries
        left out of :attr:`headers`, as written. Empty almost always. See :mod:`amqpkit.unreadable`."""
        properties = self._properties
        return properties.unreadable if type(properties) is UnreadableProperties else NOTHING_UNREADABLE

    @property
    def message_id(self) -> str | None:
        return self._properties.message_id

    @property
    def correlation_id(self) -> str | None:
        return self._properties.correlation_id

    @property
    def reply_to(self) -> str | None:
        return self._properties.reply_to

    @property
    def content_type(self) -> str | None:
        return self._properties.content_type

    @property
    def type(self) -> str | None:
        return self._properties.message_type

    @property
    def headers(self) -> Mapping[str, Any]:
        return self._properties.headers or _NO_HEADERS

    @property
    def delivery_tag(self) -> int:
        return self._settler.tag

    @property
    def settled(self) -> Settlement | None:
        """How this delivery was settled, once the settlement was handed to the connection; else None."""
        return self._settler.outcome

    @property
    def attempt(self) -> int:
        """1 for a first delivery; more after failed ones.

        Counted from ``x-delivery-count`` (quorum queues) and from ``x-death``
        entries with reason ``rejected`` (messages dead-lettered and routed
        back); a redelivery with neither counts as at least 2.
        """
        headers = self.headers
        delivery_count = as_int(headers.get(DELIVERY_COUNT))
        rejected = 0
        for death in headers.get("x-death") or ():
            if isinstance(death, Mapping) and death.get("reason") in ("rejected", "delivery_limit"):
                rejected += as_int(death.get("count"))
        attempt = 1 + max(delivery_count, rejected)
        return max(attempt, 2) if self.redelivered else attempt

    async def ack(self) -> None:
        tag = self._settler.tag
        await self._settler.settle(Settlement.ACKED, lambda channel: channel.basic_ack(tag, wait=False))

    async def nack(self, *, requeue: bool = True) -> None:
        """Negative-acknowledge: back to the queue with ``requeue=True``, else dead-lettered or dropped."""
        tag = self._settler.tag
        await self._settler.settle(
            Settlement.REQUEUED if requeue else Settlement.NACKED,
            lambda channel: channel.basic_nack(tag, requeue=requeue, wait=False),
        )

    async def reject(self, *, requeue: bool = False) -> None:
        """Reject: dead-lettered (or dropped when the queue has no dead-letter exchange)."""
        tag = self._settler.tag
        await self._settler.settle(
            Settlement.REQUEUED if requeue else Settlement.REJECTED,
            lambda channel: channel.basic_reject(tag, requeue=requeue, wait=False),
        )

    def __repr__(self) -> str:
        return (
            f"<Delivery id={self.message_id!r} rk={self.routing_key!r} "
            f"attempt={self.attempt} settled={self.settled and self.settled.value}>"
        )


_NO_HEADERS: Mapping[str, Any] = MappingProxyType({})
#: The header a quorum queue counts a message's deliveries from it in: the queue's, not the message's.
DELIVERY_COUNT = "x-delivery-count"


def delivery_from_aiormq(message: DeliveredMessage, *, auto_ack: bool = False) -> Delivery[bytes]:
    """A :class:`Delivery` from what aiormq hands a consumer or a basic.get."""
    frame = message.delivery
    properties = message.header.properties
    if type(frame) in LENIENT_METHODS:  # its exchange or routing key was not UTF-8 text
        properties = with_unreadable(properties, unreadable_of(frame))
    return Delivery(
        message.body,
        message.body,
        properties,
        redelivered=bool(getattr(frame, "redelivered", False)),
        exchange=getattr(frame, "exchange", "") or "",
        routing_key=getattr(frame, "routing_key", "") or "",
        settler=_Settler(message.channel, getattr(frame, "delivery_tag", 0) or 0, auto_ack),
    )


def delivery_channel(delivery: Delivery[Any]) -> AbstractChannel | None:
    """The channel ``delivery`` came on (where it is settled); ``Broker.lowlevel.channel_of`` for patterns."""
    return delivery._settler.channel


def as_int(value: Any, default: int = 0) -> int:
    """A header's value as an int, ``default`` when it is missing or not a number (NaN and infinities included)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default
