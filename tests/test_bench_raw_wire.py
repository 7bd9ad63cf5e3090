"""``raw-rpc-wire``: bare aiormq sending the messages amqpkit's RPC sends, so the bench can split amqpkit's
overhead into what its messages carry and what its code does. Checked here: the request and the reply carry
the same properties as amqpkit's (names and kinds of value, not ids), and the scenario runs."""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

from amqpkit import Broker, BytesCodec, Queue, RpcClient, RpcServer
from amqpkit.bench import BenchParams, run_bench
from amqpkit.bench.base import ClientOptions, ServerOptions
from amqpkit.bench.clients import RawRpcWireClient
from amqpkit.bench.servers import RawRpcWireServer

PROPERTY_NAMES = (
    "content_type", "content_encoding", "headers", "delivery_mode", "priority", "correlation_id", "reply_to",
    "expiration", "message_id", "timestamp", "message_type", "user_id", "app_id",
)  # fmt: skip


def shape(message: DeliveredMessage) -> dict[str, Any]:
    """Which properties a message sets, with the values that do not vary per call, and its header names."""
    props = message.header.properties
    out: dict[str, Any] = {}
    for name in PROPERTY_NAMES:
        value = getattr(props, name)
        if value is None:
            continue
        if name == "headers":
            value = sorted(value)
        elif name in ("correlation_id", "message_id"):
            value = "id" if name == "correlation_id" or value == props.correlation_id else "other"
        elif name in ("expiration", "reply_to"):
            value = "set"  # the caller's budget left, the broker's per-connection reply address
        out[name] = value
    return out


async def first_message(url: str, queue: str, send: Any) -> DeliveredMessage:
    """The first message ``send()`` puts on ``queue`` (a bare consumer takes it and does not answer)."""
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        await channel.queue_declare(queue, durable=True, auto_delete=True)  # 4.x refuses transient shared queues
        got: asyncio.Future[DeliveredMessage] = asyncio.get_running_loop().create_future()

        async def on_message(message: DeliveredMessage) -> None:
            if not got.done():
                got.set_result(message)

        await channel.basic_consume(queue, on_message, no_ack=True)
        sender = asyncio.ensure_future(send())
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    finally:
        await conn.close()


async def test_the_request_is_shaped_like_amqpkit_s(broker: Broker, amqp_url: str, name: str) -> None:
    client = RpcClient(broker, f"{name}.a", codec=BytesCodec(), timeout=30)
    await client.start()
    try:
        ours = await first_message(amqp_url, f"{name}.a", lambda: client.call("echo", b"x", returns=bytes))
    finally:
        await client.close()
    raw = RawRpcWireClient(ClientOptions(url=amqp_url, queue=f"{name}.b", size=16, deadline=30))
    await raw.start()
    try:
        theirs = await first_message(amqp_url, f"{name}.b", lambda: raw.operate(0, False))
    finally:
        await raw.stop()
    assert shape(theirs) == shape(ours)
    assert shape(ours)["message_type"] == "echo" and "expiration" in shape(ours)


async def test_the_reply_is_shaped_like_amqpkit_s(broker: Broker, amqp_url: str, name: str) -> None:
    async def echo(body: bytes) -> bytes:
        return body

    replies: dict[str, DeliveredMessage] = {}
    conn = await aiormq.connect(amqp_url)
    try:
        channel = await conn.channel()
        reply_queue = (await channel.queue_declare("", exclusive=True)).queue or ""

        async def on_reply(message: DeliveredMessage) -> None:
            replies[message.header.properties.correlation_id or ""] = message

        await channel.basic_consume(reply_queue, on_reply, no_ack=True)
        server = RpcServer(broker, Queue(f"{name}.a", auto_delete=True))
        server.add("echo", echo, codec=BytesCodec())
        raw = RawRpcWireServer(ServerOptions(url=amqp_url, queue=f"{name}.b"))
        async with server:
            await raw.start()
            try:
                for queue, cid in ((f"{name}.a", "ours"), (f"{name}.b", "theirs")):
                    await channel.basic_publish(
                        b"x", routing_key=queue,
                        properties=aiormq.spec.Basic.Properties(
                            correlation_id=cid, reply_to=reply_queue, message_type="echo",
                            content_type="application/octet-stream",
                        ),
                    )  # fmt: skip
                for _ in range(200):
                    if len(replies) == 2:
                        break
                    await asyncio.sleep(0.05)
            finally:
                await raw.stop()
    finally:
        await conn.close()
    assert shape(replies["theirs"]) == shape(replies["ours"])


async def test_the_scenario_runs(amqp_url: str) -> None:
    params = BenchParams(url=amqp_url, scenarios=("raw-rpc-wire", "raw-rpc"), concurrency=(1,), messages=100, warmup=10)
    result = await run_bench(params)
    runs = {r.scenario: r for r in result.results}
    assert runs["raw-rpc-wire"].errors == 0 and runs["raw-rpc-wire"].messages == 100
