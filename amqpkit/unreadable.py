"""Reading what another client sent that pamqp cannot read, on amqpkit's connections.

RabbitMQ carries a message's properties as its publisher wrote them, and checks little of them: a timestamp in
nanoseconds (beyond the year 9999, where Python's ``datetime`` ends), a short string or a header name that is
not UTF-8, a header of a type pamqp does not know. pamqp raises on such a content header (or on a
``basic.deliver`` whose routing key is not UTF-8), aiormq takes that as a broken connection and closes it, and
the broker delivers the same message again at once to the next connection: a consumer whose queue holds one
reconnects about thirty times a second, for ever, and so does everything else on its Broker.

On amqpkit's connections (:func:`reading_leniently` marks the task that opens one; the connection's reader
inherits the mark), a frame pamqp refuses is read again here, field by field:

- a property that cannot be read is left out (``None``) and its bytes are kept in ``unreadable``;
- a header that cannot be read is left out of ``headers``, and its entry, as it was written (name, type and
  value), is kept in ``unreadable["headers"]`` (entries one after another: a field table's contents); an
  entry of a type that is not known at all ends the table, and the rest is kept;
- a ``basic.deliver``, ``basic.get-ok`` or ``basic.return`` whose exchange, routing key, consumer tag or reply
  text is not UTF-8 has it with U+FFFD in place of what could not be read, and its bytes kept likewise.

The patterns refuse such a message as they refuse a body that does not decode (a worker dead-letters it, a
subscriber rejects it, an RPC server replies with an error), and a copy of it carries what could not be read, as
bytes, in the header :data:`UNREADABLE_HEADER`. A frame whose structure is broken (a length past its end) is
refused as before. Every other connection in the process, aiormq's own included, reads as pamqp does.

This patches two private functions of ``pamqp.frame`` (``_unmarshal_header_frame`` and
``_unmarshal_method_frame``), only on their failure path; ``tests/test_aiormq_compat.py`` fails if they move.
"""

from __future__ import annotations

import contextvars
import logging
import struct
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from pamqp import commands, decode, exceptions, frame
from pamqp.header import ContentHeader

from .errors import DecodeError

__all__ = [
    "LENIENT_METHODS",
    "NOTHING_UNREADABLE",
    "UNREADABLE_HEADER",
    "UnreadableProperties",
    "install",
    "reading_leniently",
    "refusal",
    "unreadable_of",
    "with_unreadable",
]

log = logging.getLogger("amqpkit.unreadable")

UNREADABLE_HEADER = "x-unreadable-properties"
"""The header in which a copy of a received message carries what could not be read: property name -> bytes."""

_LENIENT: contextvars.ContextVar[bool] = contextvars.ContextVar("amqpkit_reading_leniently", default=False)


def reading_leniently() -> None:
    """Mark the current task's context: connections opened from it read what pamqp cannot (set it in a task of
    its own, whose context is a copy, so the caller's stays as it was)."""
    _LENIENT.set(True)


class UnreadableProperties(commands.Basic.Properties):
    """Properties of which some could not be read: ``unreadable`` maps each one's name to its bytes.

    No ``__slots__`` of its own: pamqp walks ``self.__slots__`` (the parent's) to encode and decode."""

    unreadable: dict[str, bytes]


NOTHING_UNREADABLE: Mapping[str, bytes] = MappingProxyType({})
"""What :func:`unreadable_of` gives for what could all be read (read-only, shared)."""


def refusal(unreadable: Mapping[str, bytes]) -> DecodeError:
    """The error a pattern refuses a message with when some of what it arrived with could not be read."""
    names = ", ".join(sorted(unreadable))
    return DecodeError(f"what another client sent could not be read: {names} (a copy keeps it as bytes in "
                       f"the header {UNREADABLE_HEADER})")  # fmt: skip


# Sizes of the field-table values whose length does not precede them (type byte -> bytes after it).
_FIXED = {b"t": 1, b"b": 1, b"B": 1, b"s": 2, b"u": 2, b"I": 4, b"i": 4, b"f": 4,
          b"l": 8, b"L": 8, b"d": 8, b"T": 8, b"D": 5, b"V": 0, b"\x00": 0}  # fmt: skip  # pamqp: \x00 is void
_SIZED = {b"S", b"x", b"A", b"F"}  # a 4-byte length, then that many bytes


def _headers(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A field table's contents (without its length): the entries that can be read, and the rest as written."""
    headers: dict[str, Any] = {}
    kept: list[bytes] = []
    offset = 0
    while offset < len(data):
        start = offset
        size = data[offset]
        offset += 1 + size
        if offset >= len(data):
            raise ValueError("a header's name runs past the end of its table")
        kind = data[offset : offset + 1]
        if kind in _FIXED:
            end = offset + 1 + _FIXED[kind]
        elif kind in _SIZED:
            end = offset + 5 + struct.unpack_from(">I", data, offset + 1)[0]
        else:  # a type nobody knows: where it ends cannot be known either
            kept.append(data[start:])
            break
        if end > len(data):
            raise ValueError("a header runs past the end of its table")
        try:
            name = data[start + 1 : start + 1 + size].decode()
            _, value = decode.embedded_value(data[offset:end])
        except (ValueError, OverflowError, OSError, struct.error, RecursionError):
            kept.append(data[start:end])
        else:
            headers[name] = value
        offset = end
    return headers, b"".join(kept)


def _properties(flags: int, data: bytes) -> UnreadableProperties:
    properties = UnreadableProperties()
    unreadable: dict[str, bytes] = {}
    offset = 0
    for name in commands.Basic.Properties.__slots__:
        if not flags & properties.flags[name]:
            continue
        kind = getattr(commands.Basic.Properties, "_" + name)
        if kind == "shortstr":
            end = offset + 1 + data[offset]
            raw = data[offset + 1 : end]
        elif kind in ("table", "longstr"):
            end = offset + 4 + struct.unpack_from(">I", data, offset)[0]
            raw = data[offset + 4 : end]
        else:  # octet, timestamp
            end = offset + (8 if kind == "timestamp" else 1)
            raw = data[offset:end]
        if end > len(data):
            raise ValueError(f"property {name} runs past the end of the content header")
        if kind == "table":
            headers, rest = _headers(raw)
            if rest:
                unreadable[name] = rest
            setattr(properties, name, headers)
        else:
            try:
                _, value = decode.by_type(data[offset:end], kind)
            except (ValueError, OverflowError, OSError, struct.error):
                unreadable[name] = raw
            else:
                setattr(properties, name, value)
        offset = end
    properties.unreadable = unreadable
    return properties


def _content_header(data: bytes) -> ContentHeader:
    class_id, weight, body_size, flags = struct.unpack_from(">HHQH", data)
    if flags & 1:
        raise ValueError("continued property flags are not used by AMQP 0-9-1's basic class")
    header = ContentHeader(weight=weight, body_size=body_size, properties=_properties(flags, data[14:]))
    header.class_id = class_id
    return header


# What each method a message arrives with carries, in order ("bit" is one octet here: each has only one).
_METHOD_FIELDS: dict[type[Any], tuple[tuple[str, str], ...]] = {
    commands.Basic.Deliver: (("consumer_tag", "shortstr"), ("delivery_tag", ">Q"), ("redelivered", "bit"),
                             ("exchange", "shortstr"), ("routing_key", "shortstr")),
    commands.Basic.GetOk: (("delivery_tag", ">Q"), ("redelivered", "bit"), ("exchange", "shortstr"),
                           ("routing_key", "shortstr"), ("message_count", ">I")),
    commands.Basic.Return: (("reply_code", ">H"), ("reply_text", "shortstr"), ("exchange", "shortstr"),
                            ("routing_key", "shortstr")),
    # RabbitMQ cuts a close's reply text at 255 bytes, in the middle of a character if a name it quotes (a
    # routing key refused by a topic permission) runs that far: pamqp refused the frame and aiormq dropped the
    # whole connection, every publish on it failing with an untyped InvalidFrameError.
    commands.Channel.Close: (("reply_code", ">H"), ("reply_text", "shortstr"), ("class_id", ">H"),
                             ("method_id", ">H")),
    commands.Connection.Close: (("reply_code", ">H"), ("reply_text", "shortstr"), ("class_id", ">H"),
                                ("method_id", ">H")),
}  # fmt: skip
_LENIENT_METHODS: dict[type[Any], type[Any]] = {
    method: type(method.__name__, (method,), {"__doc__": f"{method.__name__} with fields not UTF-8 text."})
    for method in _METHOD_FIELDS
}


LENIENT_METHODS = frozenset(_LENIENT_METHODS.values())
"""The types of the method frames read here (a delivery's frame of one of them may have ``unreadable``)."""


_CARRIERS = frozenset({UnreadableProperties, *LENIENT_METHODS})


def unreadable_of(value: object) -> Mapping[str, bytes]:
    """What could not be read of a frame or properties (empty when everything could: one type check, 40 ns)."""
    if type(value) in _CARRIERS:
        found: Mapping[str, bytes] = value.unreadable  # type: ignore[attr-defined]
        return found
    return NOTHING_UNREADABLE


def with_unreadable(properties: commands.Basic.Properties, more: Mapping[str, bytes]) -> UnreadableProperties:
    """``properties`` with ``more`` added to what could not be read (a copy when they are pamqp's own)."""
    if not isinstance(properties, UnreadableProperties):
        copy = UnreadableProperties()
        for name in commands.Basic.Properties.__slots__:
            setattr(copy, name, getattr(properties, name))
        copy.unreadable = {}
        properties = copy
    properties.unreadable.update(more)
    return properties


def _method(data: bytes) -> Any:
    (index,) = struct.unpack_from(">I", data)
    method = commands.INDEX_MAPPING.get(index)
    if method not in _METHOD_FIELDS:
        raise ValueError("not a method read here")
    result = _LENIENT_METHODS[method]()
    unreadable: dict[str, bytes] = {}
    offset = 4
    for name, kind in _METHOD_FIELDS[method]:
        if kind == "shortstr":
            end = offset + 1 + data[offset]
            if end > len(data):
                raise ValueError(f"{name} runs past the end of the frame")
            raw = data[offset + 1 : end]
            try:
                value: Any = raw.decode()
            except UnicodeDecodeError:
                value = raw.decode(errors="replace")
                unreadable[name] = raw
            offset = end
        elif kind == "bit":
            value = bool(data[offset] & 1)
            offset += 1
        else:
            (value,) = struct.unpack_from(kind, data, offset)
            offset += struct.calcsize(kind)
        setattr(result, name, value)
    result.unreadable = unreadable
    return result


def _lenient(strict: Callable[[bytes], Any], again: Callable[[bytes], Any], what: str) -> Callable[[bytes], Any]:
    def unmarshal(frame_data: bytes) -> Any:
        try:
            return strict(frame_data)
        except (exceptions.UnmarshalingException, RecursionError) as refused:
            # RecursionError: pamqp reads nested tables and arrays by recursion; a header nested some 600 deep
            # (3 KB, which RabbitMQ carries) exhausts the stack instead of raising pamqp's own error.
            if not _LENIENT.get():
                raise
            try:
                result = again(frame_data)
            except (ValueError, IndexError, struct.error):
                raise refused from None
            log.debug(  # the pattern that refuses the message says so, once
                "a %s another client sent could not be read whole (%s); kept as bytes: %s",
                what, refused, ", ".join(sorted(unreadable_of(getattr(result, "properties", result)))),
            )  # fmt: skip
            return result

    unmarshal.__wrapped__ = strict  # type: ignore[attr-defined]
    return unmarshal


def install() -> None:
    """Put the lenient readers in place (once; a connection not marked by :func:`reading_leniently` still reads
    as pamqp does)."""
    if hasattr(frame._unmarshal_header_frame, "__wrapped__"):
        return
    frame._unmarshal_header_frame = _lenient(  # type: ignore[assignment]
        frame._unmarshal_header_frame, _content_header, "content header"
    )
    frame._unmarshal_method_frame = _lenient(  # type: ignore[assignment]
        frame._unmarshal_method_frame, _method, "method frame"
    )
