"""amqpkit.unreadable's readers, without a broker: only a connection marked as amqpkit's reads leniently, and
a frame whose structure is broken is refused as before."""

from __future__ import annotations

import contextvars
import struct

import pytest
from pamqp import frame
from pamqp.exceptions import UnmarshalingException

import amqpkit  # noqa: F401  # installs the lenient readers, as importing amqpkit does
from amqpkit.unreadable import reading_leniently, unreadable_of

NANOSECONDS = struct.pack(">Q", 1_700_000_000_000_000_000)


def header_frame(flags: int, data: bytes, body_size: int = 3) -> bytes:
    payload = struct.pack(">HHQH", 60, 0, body_size, flags) + data
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


def deliver_frame(routing_key: bytes) -> bytes:
    args = b"\x03tag" + struct.pack(">Q", 7) + b"\x01" + b"\x02ex" + bytes([len(routing_key)]) + routing_key
    payload = struct.pack(">HH", 60, 60) + args
    return struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce"


def leniently(data: bytes) -> object:
    def read() -> object:
        reading_leniently()
        return frame.unmarshal(data)[2]

    return contextvars.copy_context().run(read)


def test_a_connection_not_marked_reads_as_pamqp_does() -> None:
    with pytest.raises(UnmarshalingException):
        frame.unmarshal(header_frame(1 << 6, NANOSECONDS))
    with pytest.raises(UnmarshalingException):
        frame.unmarshal(deliver_frame(b"caf\xe9"))


def test_a_marked_connection_keeps_what_it_cannot_read() -> None:
    message_id = b"\x02id"
    header = leniently(header_frame((1 << 7) | (1 << 6) | (1 << 3), message_id + NANOSECONDS + b"\x03app"))
    properties = header.properties  # type: ignore[attr-defined]
    assert (properties.message_id, properties.timestamp, properties.app_id) == ("id", None, "app")
    assert unreadable_of(properties) == {"timestamp": NANOSECONDS}
    assert header.body_size == 3  # type: ignore[attr-defined]

    deliver = leniently(deliver_frame(b"caf\xe9"))
    assert deliver.routing_key == "caf\ufffd" and deliver.exchange == "ex"  # type: ignore[attr-defined]
    assert deliver.delivery_tag == 7 and deliver.redelivered is True  # type: ignore[attr-defined]
    assert unreadable_of(deliver) == {"routing_key": b"caf\xe9"}


def test_a_broken_frame_is_refused_even_when_marked() -> None:
    with pytest.raises(UnmarshalingException):
        leniently(header_frame(1 << 6, NANOSECONDS[:5]))  # the timestamp cut short
    table = struct.pack(">I", 40) + b"\x01a" + b"S" + struct.pack(">I", 2) + b"\xff\xfe"  # a table said to be longer
    with pytest.raises(UnmarshalingException):
        leniently(header_frame(1 << 13, table))


def test_a_header_of_an_unknown_type_ends_what_can_be_read() -> None:
    entries = b"\x01aS" + struct.pack(">I", 1) + b"x" + b"\x01bZ\x00\x00" + b"\x01cS" + struct.pack(">I", 1) + b"y"
    header = leniently(header_frame(1 << 13, struct.pack(">I", len(entries)) + entries))
    properties = header.properties  # type: ignore[attr-defined]
    assert properties.headers == {"a": "x"}
    assert unreadable_of(properties) == {"headers": entries[8:]}  # "b" and all after it, as written


def test_a_header_nested_past_the_stack_is_kept_as_bytes() -> None:
    """pamqp reads nested values by recursion: at some 600 levels it raises RecursionError, not its own error."""
    value = b"S" + struct.pack(">I", 1) + b"x"
    for _ in range(2000):
        value = b"A" + struct.pack(">I", len(value)) + value
    entries = b"\x01a" + value + b"\x01bS" + struct.pack(">I", 1) + b"y"
    data = header_frame(1 << 13, struct.pack(">I", len(entries)) + entries)
    with pytest.raises(RecursionError):
        frame.unmarshal(data)
    properties = leniently(data).properties  # type: ignore[attr-defined]
    assert properties.headers == {"b": "y"}
    assert unreadable_of(properties) == {"headers": entries[: -len(b"\x01bS") - 5]}


def test_what_pamqp_reads_is_read_the_same_beside_what_it_cannot() -> None:
    """The void type pamqp also reads as \\x00, beside a timestamp it cannot read: read as pamqp reads it."""
    entries = b"\x01a\x00" + b"\x01bS" + struct.pack(">I", 1) + b"y"
    header = leniently(header_frame((1 << 13) | (1 << 6), struct.pack(">I", len(entries)) + entries + NANOSECONDS))
    properties = header.properties  # type: ignore[attr-defined]
    assert properties.headers == {"a": None, "b": "y"}
    assert unreadable_of(properties) == {"timestamp": NANOSECONDS}


def test_a_header_name_past_the_end_of_its_table_is_refused() -> None:
    entries = b"\x09ab"  # a name said to be 9 bytes long, in a table of 3
    with pytest.raises(UnmarshalingException):
        leniently(header_frame((1 << 13) | (1 << 6), struct.pack(">I", len(entries)) + entries + NANOSECONDS))
