"""Bad input, sent with a raw client into a worker, a subscriber and an RPC server.

Each bad message is dead-lettered or rejected with its reason and logged
once; the process stays up; the good messages sent between them are all
processed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiormq
import pytest
from pamqp.commands import Basic
from pydantic import BaseModel

from amqpkit import (
    Binding,
    Broker,
    Delivery,
    Envelope,
    Exchange,
    MessageTooLarge,
    Queue,
    RpcServer,
    Subscriber,
    Worker,
    WorkQueue,
)

from ..waiting import until_ready, wait_for


class Order(BaseModel):
    id: int
    item: str


@dataclass
class Bad:
    label: str
    body: bytes
    content_type: str | None
    headers: dict[str, Any] | None = None
    reply_to: str | None = "amq.rabbitmq.reply-to.none"
    correlation_id: str | None = "c"


HUGE_HEADERS = {f"h{i:05d}": "x" * 8 for i in range(3000)}

FOR_MODELS = [
    Bad("malformed-json", b'{"id": 1, "item": ', "application/json"),
    Bad("schema", b'{"id": "one", "item": 2}', "application/json"),
    Bad("unknown-type", b"<order/>", "application/xml"),
    Bad(
        "pickle", b"\x80\x04\x95\x0c\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.", "application/python-pickle"
    ),
    Bad("empty", b"", "application/json"),
    Bad("huge-headers", b"not json at all", "application/json", headers=HUGE_HEADERS),
]
FOR_TEXT = [
    Bad("invalid-utf8", b"caf\xe9 \xff\xfe", "text/plain"),
    Bad("pickle", b"\x80\x04K\x01.", "application/python-pickle"),
]
FOR_RPC_ONLY = [
    Bad("no-reply-to", b'{"id": 1, "item": "x"}', "application/json", reply_to=None),
    Bad("no-correlation-id", b'{"id": 1, "item": "x"}', "application/json", correlation_id=None),
]


@pytest.fixture
async def raw(amqp_url: str) -> AsyncIterator[Any]:
    """A bare aiormq channel: nothing of amqpkit between the test and the broker."""
    conn = await aiormq.connect(amqp_url)
    channel = await conn.channel()
    yield channel
    await conn.close()


async def send_raw(channel: Any, routing_key: str, bad: Bad, message_id: str, exchange: str = "") -> None:
    await channel.basic_publish(
        bad.body,
        exchange=exchange,
        routing_key=routing_key,
        properties=Basic.Properties(
            content_type=bad.content_type, headers=bad.headers, message_id=message_id,
            reply_to=bad.reply_to, correlation_id=bad.correlation_id, message_type=None,
        ),
    )  # fmt: skip


async def send_good(channel: Any, routing_key: str, n: int, text: bool, exchange: str = "") -> None:
    body = f"order {n}".encode() if text else Order(id=n, item="ok").model_dump_json().encode()
    await channel.basic_publish(
        body, exchange=exchange, routing_key=routing_key,
        properties=Basic.Properties(content_type="text/plain" if text else "application/json",
                                    message_id=f"good-{n}", reply_to="amq.rabbitmq.reply-to.none",
                                    correlation_id=f"g{n}"),
    )  # fmt: skip


async def drain(broker: Broker, queue: str) -> dict[str, Delivery[bytes]]:
    found: dict[str, Delivery[bytes]] = {}
    while (d := await broker.get(queue, auto_ack=True)) is not None:
        found[d.message_id or ""] = d
    return found


def logged_once(caplog: pytest.LogCaptureFixture, message_id: str) -> None:
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("amqpkit") and message_id in r.getMessage()]
    assert len(lines) == 1, (message_id, lines)
    assert len(lines[0]) < 2000, "a log line must not dump the message"


@pytest.mark.parametrize("text", [False, True], ids=["model", "text"])
async def test_worker(broker: Broker, raw: Any, name: str, text: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    bads = FOR_TEXT if text else FOR_MODELS
    done: list[Any] = []

    async def on_order(order: Order) -> None:
        done.append(order.id)

    async def on_text(body: str) -> None:
        done.append(body)

    work: WorkQueue[Any] = WorkQueue(broker, f"{name}.w")
    try:
        async with Worker(work, on_text if text else on_order, concurrency=4) as worker:
            for i, bad in enumerate(bads):
                await send_good(raw, work.name, i, text)
                await send_raw(raw, work.name, bad, f"bad-{bad.label}")
            await send_good(raw, work.name, 99, text)
            await wait_for(lambda: len(done) == len(bads) + 1 and worker.dead_lettered == len(bads))
        assert worker.retried == 0
        dead = await drain(broker, work.dlq_name)
        assert set(dead) == {f"bad-{b.label}" for b in bads}
        for d in dead.values():
            assert d.headers["x-dead-letter-reason"] == "decode-error"
            assert d.headers["x-error-type"] == "DecodeError"
            assert d.headers["x-error-message"]
            logged_once(caplog, d.message_id or "")
    finally:
        for q in (work.name, work.dlq_name):
            await broker.delete_queue(q)


@pytest.mark.parametrize("text", [False, True], ids=["model", "text"])
async def test_subscriber(broker: Broker, raw: Any, name: str, text: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    bads = FOR_TEXT if text else FOR_MODELS
    done: list[Any] = []

    async def on_order(order: Order) -> None:
        done.append(order.id)

    async def on_text(body: str) -> None:
        done.append(body)

    ex = Exchange(f"{name}.events", type="fanout")
    dlx = Exchange(f"{name}.dlx", type="fanout")
    dlq = Queue(f"{name}.dlq")
    await broker.declare(dlx, dlq, Binding(dlx, dlq))
    try:
        sub = Subscriber(broker, ex, on_text if text else on_order, queue=f"{name}.sub", dead_letter_exchange=dlx.name)
        async with sub:
            for i, bad in enumerate(bads):
                await send_good(raw, "", i, text, exchange=ex.name)
                await send_raw(raw, "", bad, f"bad-{bad.label}", exchange=ex.name)
            await send_good(raw, "", 99, text, exchange=ex.name)
            await wait_for(lambda: len(done) == len(bads) + 1 and sub.rejected == len(bads))
        await until_ready(broker, dlq.name, len(bads))
        dead = await drain(broker, dlq.name)
        assert set(dead) == {f"bad-{b.label}" for b in bads}
        for message_id in dead:
            logged_once(caplog, message_id)
        reasons = " ".join(r.getMessage() for r in caplog.records)
        assert "cannot decode" in reasons
    finally:
        for q in (f"{name}.sub", dlq.name):
            await broker.delete_queue(q)
        for x in (ex, dlx):
            await broker.delete_exchange(x)


@pytest.mark.parametrize("text", [False, True], ids=["model", "text"])
async def test_rpc_server(broker: Broker, raw: Any, name: str, text: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    bads = (FOR_TEXT if text else FOR_MODELS) + FOR_RPC_ONLY
    done: list[Any] = []

    async def on_order(order: Order) -> int:
        done.append(order.id)
        return order.id

    async def on_text(body: str) -> str:
        done.append(body)
        return body

    dlx = Exchange(f"{name}.dlx", type="fanout")
    dlq = Queue(f"{name}.dlq")
    await broker.declare(dlx, dlq, Binding(dlx, dlq))
    queue = Queue(f"{name}.rpc", dead_letter_exchange=dlx.name)
    server = RpcServer(broker, queue, concurrency=4)
    server.add("m", on_text if text else on_order)
    try:
        async with server:
            for i, bad in enumerate(bads):
                await send_good(raw, queue.name, i, text)
                await send_raw(raw, queue.name, bad, f"bad-{bad.label}")
            await send_good(raw, queue.name, 99, text)
            await wait_for(lambda: len(done) == len(bads) + 1 and server.rejected == len(bads))
        await until_ready(broker, dlq.name, len(bads))
        dead = await drain(broker, dlq.name)
        assert set(dead) == {f"bad-{b.label}" for b in bads}
        for message_id in dead:
            logged_once(caplog, message_id)
    finally:
        for q in (queue.name, dlq.name):
            await broker.delete_queue(q)
        await broker.delete_exchange(dlx)


async def test_over_max_message_size_is_refused_client_side(broker: Broker, name: str) -> None:
    limit = broker.settings.max_message_size
    with pytest.raises(MessageTooLarge) as info:
        await broker.publish(Envelope(b"x" * (limit + 1)), routing_key=f"{name}.nowhere")
    assert info.value.size == limit + 1
    with contextlib.suppress(Exception):
        await broker.delete_queue(f"{name}.nowhere")
