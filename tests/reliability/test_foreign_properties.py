"""Messages from other clients whose properties amqpkit's codec (pamqp) cannot read, or reads but cannot send
again: RabbitMQ carries them as they came, so a consumer meets them at the head of its queue.

Each is written here byte for byte on a bare connection. What must hold: the connection stays up (no
reconnect), the message is not lost (it reaches the dead-letter queue, its unreadable parts kept as bytes), and
the messages behind it are processed.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiormq
import pytest
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from amqpkit import (
    Binding,
    Broker,
    Delivery,
    Envelope,
    Exchange,
    Queue,
    RetryPolicy,
    RpcClient,
    RpcServer,
    Subscriber,
    Worker,
    WorkQueue,
)

from ..retrying import failed_once_then_done, retried_queue
from ..waiting import until_ready, wait_for

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
    work = retried_queue(broker, name)
    await work.declare()
    raw = b"\xff\xfe latin-1 caf\xe9"
    async with bare(amqp_url) as channel:
        await send_foreign(channel, name, b"1", {"headers": table(short(b"blob") + b"S" + long(raw))})
    seen = await failed_once_then_done(broker, work)
    assert seen[0].headers["blob"] == raw  # as it came: pamqp gives bytes
    assert bytes(seen[1].headers["blob"]) == raw  # the copy: the same bytes, sent as a byte array


NANOSECONDS = struct.pack(">Q", 1_700_000_000_000_000_000)  # a timestamp in ns: pamqp reads past the year 9999
UNREADABLE: dict[str, tuple[dict[str, bytes], dict[str, bytes]]] = {
    # label: (fields besides the readable ones, what the copy must keep of them)
    "timestamp in nanoseconds": ({"timestamp": NANOSECONDS}, {"timestamp": NANOSECONDS}),
    "message id not UTF-8": ({"message_id": short(b"id-\xff\xfe")}, {"message_id": b"id-\xff\xfe"}),
    "reply-to not UTF-8": ({"reply_to": short(b"\xc3(")}, {"reply_to": b"\xc3("}),
}
KEEP = short(b"keep") + b"S" + long(b"yes")
BAD_NAME = short(b"caf\xe9") + b"S" + long(b"no")
BAD_TIME = short(b"when") + b"T" + struct.pack(">Q", 2**64 - 1)
NESTED = short(b"nested") + b"F" + table(BAD_NAME)


def deep(depth: int) -> bytes:
    """A header nested ``depth`` arrays deep: pamqp, which reads by recursion, runs out of stack at about 600."""
    value = b"S" + long(b"x")
    for _ in range(depth):
        value = b"A" + long(value)
    return short(b"deep") + value


DEEP = deep(1000)
HEADERS: dict[str, tuple[bytes, bytes]] = {
    # label: (the table's entries, after the readable one, and what the copy must keep of them)
    "header name not UTF-8": (BAD_NAME + KEEP, BAD_NAME),
    "header timestamp out of range": (BAD_TIME, BAD_TIME),
    "nested header name not UTF-8": (NESTED + KEEP, NESTED),
    "header nested 1,000 deep": (DEEP + KEEP, DEEP),
}
# Not here: a header of a type nobody knows. The decoder keeps the rest of the table as bytes (where such a
# value ends cannot be known), but RabbitMQ 3.10 refuses the publish (541 INTERNAL_ERROR), so none arrives.


def _fields(label: str, extra: dict[str, bytes], entries: bytes = b"") -> dict[str, bytes]:
    fields = {"content_type": short(b"application/json"), "message_id": short(label.encode()),
              "headers": table(short(b"first") + b"S" + long(b"read") + entries)}  # fmt: skip
    fields.update(extra)
    return fields


def _kept(letter: Delivery[Any]) -> dict[str, bytes]:
    return {name: bytes(raw) for name, raw in letter.headers["x-unreadable-properties"].items()}


CASES = {label: (_fields(label, extra), kept) for label, (extra, kept) in UNREADABLE.items()} | {
    label: (_fields(label, {}, entries), {"headers": kept}) for label, (entries, kept) in HEADERS.items()
}


async def test_a_worker_dead_letters_what_it_cannot_read_without_losing_its_connection(
    broker: Broker, name: str, amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each message whose properties pamqp cannot read reaches the dead-letter queue, with what could not be
    read kept as bytes; the tasks around them run; the Broker never reconnects. Before, the first such message
    closed the connection, and each reconnect met it again (about 30 reconnects a second, for ever)."""
    work: WorkQueue[int] = WorkQueue(broker, name)
    await work.declare()
    done: list[int] = []

    async def handler(value: int) -> None:
        done.append(value)

    reconnects = broker.reconnects
    try:
        async with bare(amqp_url) as channel:
            for i, (fields, _) in enumerate(CASES.values()):
                await channel.basic_publish(str(i).encode(), routing_key=name)
                await send_foreign(channel, name, b"99", fields)
            await channel.basic_publish(b"100", routing_key=name)
        async with Worker(work, handler, concurrency=2) as worker:
            await wait_for(lambda: len(done) == len(CASES) + 1 and worker.dead_lettered == len(CASES), timeout=20)
        assert sorted(done) == [*range(len(CASES)), 100]
        assert broker.reconnects == reconnects
        dead = {}
        while (letter := await broker.get(work.dlq_name, auto_ack=True)) is not None:
            dead[letter.body, letter.headers.get("first"), letter.message_id] = letter
        assert len(dead) == len(CASES)
        for label, (_, kept) in CASES.items():
            [letter] = [d for d in dead.values() if _kept(d) == kept]  # (a message id not read is a new one)
            assert letter.headers["x-dead-letter-reason"] == "decode-error", label
            assert letter.headers["first"] == "read", label  # what could be read is kept as it was
            assert letter.body == b"99"
            if label == "header name not UTF-8":
                assert letter.headers["keep"] == "yes"  # the header after the unreadable one
        refused = [
            r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "could not be" in r.getMessage()
        ]
        assert len(refused) == len(CASES), refused  # once each
    finally:
        for queue in [work.name, work.dlq_name]:
            await broker.delete_queue(queue)


@contextmanager
def routing_key_as(raw: bytes) -> Iterator[None]:
    """While inside, a publish's routing key is written as ``raw`` (pamqp only writes text)."""
    original = Basic.Publish.marshal

    def marshal(self: Any) -> bytes:
        return struct.pack(">H", 0) + short(self.exchange.encode()) + short(raw) + b"\0"

    Basic.Publish.marshal = marshal  # type: ignore[method-assign]
    try:
        yield
    finally:
        Basic.Publish.marshal = original  # type: ignore[method-assign]


async def test_a_routing_key_that_is_not_text_is_kept_as_bytes(broker: Broker, name: str, amqp_url: str) -> None:
    """A basic.deliver whose routing key is not UTF-8 (another client published it so, through a fanout
    exchange): the worker dead-letters the task, and the copy keeps the routing key as bytes."""
    work: WorkQueue[int] = WorkQueue(broker, name)
    fanout = Exchange(f"{name}.in", type="fanout")
    await work.declare()
    await broker.declare(fanout, Binding(fanout, work.queue))
    reconnects = broker.reconnects
    try:
        async with bare(amqp_url) as channel:
            with routing_key_as(b"orders.caf\xe9"):
                await channel.basic_publish(b"1", exchange=fanout.name, routing_key="")
        async with Worker(work, lambda value: None, concurrency=1) as worker:
            await wait_for(lambda: worker.dead_lettered == 1, timeout=20)
        letter = await broker.get(work.dlq_name, auto_ack=True)
        assert letter is not None and letter.body == b"1"
        assert _kept(letter) == {"routing_key": b"orders.caf\xe9"}
        assert letter.headers["x-original-routing-key"] == "orders.caf\ufffd"  # what could be read, marked
        assert broker.reconnects == reconnects
    finally:
        for queue in [work.name, work.dlq_name]:
            await broker.delete_queue(queue)
        await broker.delete_exchange(fanout)


async def test_a_subscriber_rejects_it_and_the_broker_dead_letters_it_whole(
    broker: Broker, name: str, amqp_url: str
) -> None:
    """A subscriber rejects the message (as one whose body does not decode); the broker's dead-lettering moves
    the message as it was written, nanosecond timestamp and all."""
    fanout = Exchange(f"{name}.events", type="fanout")
    dlx = Exchange(f"{name}.dlx", type="fanout")
    dlq = Queue(f"{name}.dlq")
    await broker.declare(dlx, dlq, Binding(dlx, dlq))
    seen: list[int] = []

    async def handler(value: int) -> None:
        seen.append(value)

    reconnects = broker.reconnects
    subscriber = Subscriber(broker, fanout, handler, queue=f"{name}.sub", dead_letter_exchange=dlx.name)
    try:
        async with subscriber, bare(amqp_url) as channel:
            fields, _ = CASES["timestamp in nanoseconds"]
            with content_header_as(properties_frame(1, fields)):
                await channel.basic_publish(b"7", exchange=fanout.name)
            await channel.basic_publish(b"8", exchange=fanout.name)
            await wait_for(lambda: seen == [8] and subscriber.rejected == 1)
        await until_ready(broker, dlq.name, 1)
        async with bare(amqp_url) as channel:  # read it as it is stored: a bare channel cannot decode it
            with pytest.raises(aiormq.exceptions.AMQPError):
                await channel.basic_get(dlq.name)
        letter = await broker.get(dlq.name, auto_ack=True)
        assert letter is not None and letter.body == b"7"
        assert letter.unreadable == {"timestamp": NANOSECONDS}  # the broker moved the original, unread
        assert letter.headers["first"] == "read"
        assert broker.reconnects == reconnects
    finally:
        for queue in (f"{name}.sub", dlq.name):
            await broker.delete_queue(queue)
        for exchange in (fanout, dlx):
            await broker.delete_exchange(exchange)


async def test_an_rpc_server_answers_a_request_it_cannot_read(broker: Broker, name: str, amqp_url: str) -> None:
    """An RPC request whose properties cannot all be read, from another client: the server replies with a
    DecodeError (so that call ends) and serves the next call."""
    server = RpcServer(broker, Queue(f"{name}.rpc"))
    server.add("echo", lambda value: value)
    reconnects = broker.reconnects
    try:
        async with server, bare(amqp_url) as channel:
            replies = (await channel.queue_declare(exclusive=True)).queue
            fields = {"reply_to": short(replies.encode()), "correlation_id": short(b"c1"),
                      "message_type": short(b"echo"), "timestamp": NANOSECONDS}  # fmt: skip
            await send_foreign(channel, f"{name}.rpc", b"1", fields)
            await wait_for(lambda: server.rejected == 1)
            reply = None
            for _ in range(100):
                if (reply := await channel.basic_get(replies, no_ack=True)).body:
                    break
                await asyncio.sleep(0.05)
            assert reply is not None and reply.header.properties.correlation_id == "c1"
            assert json.loads(reply.body)["error"]["type"] == "DecodeError"
            async with RpcClient(broker, f"{name}.rpc") as client:
                assert await client.call("echo", 5, returns=int) == 5
        assert broker.reconnects == reconnects
    finally:
        await broker.delete_queue(f"{name}.rpc")


ATTEMPTS_SENT: dict[str, Any] = {
    "over 64 bits, as a double": 1e300,
    "over 64 bits, as text": "1" * 30,
    "the largest 64-bit": 2**63 - 1,
    "negative": -5,
    "not a number": "third",
}


async def test_an_attempt_count_another_client_wrote_cannot_hold_a_task_up(broker: Broker, name: str) -> None:
    """``x-attempt`` as another client may have written it. Over 64 bits, the dead-letter copy could not carry it
    (nor a retry's attempt + 1): the task went back to its queue and ran again every second, for ever. Negative,
    it bought extra attempts (-5: seven runs where two are allowed). Now it counts from 1 to 2**31 - 1."""
    work: WorkQueue[int] = WorkQueue(broker, name, retry=RetryPolicy(max_attempts=2, initial_delay=0.05, jitter=0))
    await work.declare()
    runs: dict[str, int] = {}

    async def handler(delivery: Delivery[int]) -> None:
        runs[delivery.message_id or ""] = runs.get(delivery.message_id or "", 0) + 1
        raise RuntimeError("always fails")

    try:
        for label, attempt in ATTEMPTS_SENT.items():
            await broker.publish(Envelope(b"1", headers={"x-attempt": attempt}, message_id=label), routing_key=name)
        async with Worker(work, handler, concurrency=2) as worker:
            await wait_for(lambda: worker.dead_lettered == len(ATTEMPTS_SENT), timeout=20)
        assert worker.forward_failures == 0
        assert runs == {
            "over 64 bits, as a double": 1,
            "over 64 bits, as text": 1,
            "the largest 64-bit": 1,
            "negative": 2,
            "not a number": 2,
        }
    finally:
        for queue in [work.name, work.dlq_name, f"{work.name}.retry.50"]:
            await broker.delete_queue(queue)
