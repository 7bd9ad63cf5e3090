"""Messages from other clients whose properties amqpkit's codec (pamqp) cannot read, or reads but cannot send
again: RabbitMQ carries them as they came, so a consumer meets them at the head of its queue.

Each is written here byte for byte on a bare connection. What must hold: the connection stays up (no
reconnect), the message is not lost (it reaches the dead-letter queue, its unreadable parts kept as bytes), and
the messages behind it are processed.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiormq
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from amqpkit import Broker, Delivery, RetryPolicy, Worker, WorkQueue

from ..waiting import wait_for

# Bit of each property in the content header's flags, as AMQP 0-9-1 numbers them.
FLAG = {name: 1 << (15 - i) for i, name in enumerate(Basic.Properties.__slots__)}


def short(text: bytes) -> bytes:
    return bytes([len(text)]) + text


def long(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def table(*entries: bytes) -> bytes:
    return long(b"".join(entries))


def properties_frame(body_size: int, fields: dict[str, bytes]) -> bytes:
    """A content header's payload with ``fields`` (property name -> its encoded value) as they are given."""
    flags = 0
    data = b""
    for name in Basic.Properties.__slots__:
        if name in fields:
            flags |= FLAG[name]
            data += fields[name]
    return struct.pack(">HHQH", 60, 0, body_size, flags) + data


@asynccontextmanager
async def bare(amqp_url: str) -> AsyncIterator[Any]:
    connection = await aiormq.connect(amqp_url)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


@contextmanager
def content_header_as(payload: bytes) -> Iterator[None]:
    """While inside, the next content header written is ``payload`` (what another client's encoder made)."""
    original = ContentHeader.marshal
    ContentHeader.marshal = lambda self: payload  # type: ignore[method-assign]
    try:
        yield
    finally:
        ContentHeader.marshal = original  # type: ignore[method-assign]


async def send_foreign(channel: Any, queue: str, body: bytes, fields: dict[str, bytes]) -> None:
    with content_header_as(properties_frame(len(body), fields)):
        await channel.basic_publish(body, routing_key=queue)


async def test_a_header_value_that_is_not_text_survives_a_retry(broker: Broker, name: str, amqp_url: str) -> None:
    """A long-string header value that is not UTF-8 (pamqp reads it as bytes, and cannot send bytes): the retry's
    copy carries the same bytes, as a byte array. Before, the copy could not be encoded, and the task went back
    to its queue once a second, forever, without reaching its retry or its dead-letter queue."""
    work: WorkQueue[int] = WorkQueue(broker, name, retry=RetryPolicy(max_attempts=3, initial_delay=0.1, jitter=0))
    await work.declare()
    raw = b"\xff\xfe latin-1 caf\xe9"
    async with bare(amqp_url) as channel:
        await send_foreign(channel, name, b"1", {"headers": table(short(b"blob") + b"S" + long(raw))})
    seen: list[Delivery[Any]] = []

    async def handler(delivery: Delivery[Any]) -> None:
        seen.append(delivery)
        if len(seen) == 1:
            raise RuntimeError("first attempt fails")

    try:
        async with Worker(work, handler, concurrency=1) as worker:
            await wait_for(lambda: worker.completed == 1, timeout=20)
        assert worker.retried == 1 and worker.forward_failures == 0
        assert seen[0].headers["blob"] == raw  # as it came: pamqp gives bytes
        assert bytes(seen[1].headers["blob"]) == raw  # the copy: the same bytes, sent as a byte array
    finally:
        for queue in [work.name, work.dlq_name, f"{work.name}.retry.100"]:
            await broker.delete_queue(queue)
