"""aiormq's internals amqpkit relies on (amqpkit.aiormq_compat) are there, and the fast paths built on them run.

An aiormq upgrade that renames one of them must fail here, not leave RPC on
its slower fallback (a confirm per request) without anyone noticing.
"""

from __future__ import annotations

import asyncio
import time
from importlib.metadata import version

import aiormq
import pytest
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pamqp.commands import Channel as ChannelSpec
from pamqp.header import ContentHeader

from amqpkit import Broker, NoResponder, Queue, RpcClient, RpcServer, aiormq_compat


def test_the_internals_are_where_the_compat_module_says() -> None:
    assert aiormq_compat.AmqpConnection.HEARTBEAT_GRACE_MULTIPLIER == 1
    assert aiormq.Connection.HEARTBEAT_GRACE_MULTIPLIER == 3  # what aiormq would do without us
    for name in ("_Channel__get_content_header", "_read_content", "_on_return_frame", "_on_deliver_frame"):
        assert hasattr(aiormq.Channel, name), f"aiormq {version('aiormq')} has no Channel.{name}"
    assert "wait" in aiormq.Channel.basic_publish.__code__.co_varnames
    # What a publish nothing can hold up is queued with, instead of basic_publish (publish_nowait).
    assert callable(aiormq.Channel._split_body)
    assert callable(aiormq.channel._check_routing_key)
    assert callable(ChannelFrame.marshall)
    assert isinstance(aiormq.Connection.FRAME_BUFFER_SIZE, int)


async def test_a_channel_the_broker_is_closing_is_seen_as_closing(broker: Broker) -> None:
    channel = await broker.lowlevel.open_channel()
    assert isinstance(getattr(channel, "_Channel__lock", None), asyncio.Lock)
    assert isinstance(channel.delivery_tag, int)  # type: ignore[attr-defined]
    assert isinstance(getattr(channel, "_Channel__close_event", None), asyncio.Event)
    assert not aiormq_compat.closing(channel)
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await channel.exchange_declare("amqpkit-compat-no-such-exchange", passive=True)
    assert aiormq_compat.closing(channel)


async def test_the_broker_s_connection_has_the_gated_write_queue(broker: Broker) -> None:
    conn = broker._conn
    assert conn is not None
    assert type(conn.write_queue).__name__ == "_WriteQueue"
    assert isinstance(conn.channels, dict)


async def test_the_gate_refuses_a_publish_on_a_closing_channel_and_never_drops_a_close_ok(broker: Broker) -> None:
    conn = broker._conn
    assert conn is not None
    channel = await broker.lowlevel.open_channel()
    gate = aiormq_compat._WriteQueue(conn, 1)  # a queue of its own, so the connection's writer does not drain it

    def publish_frame() -> ChannelFrame:
        return ChannelFrame.marshall(
            channel_number=channel.number,
            frames=[Basic.Publish(exchange="", routing_key="q"), ContentHeader(body_size=0)],
        )

    gate.put_nowait(publish_frame())  # an open channel: accepted
    with pytest.raises(asyncio.QueueFull):
        gate.put_nowait(publish_frame())  # a publish waits for room as before
    close_ok = ChannelFrame.marshall(channel_number=channel.number, frames=[ChannelSpec.CloseOk()])
    gate.put_nowait(close_ok)  # full, but a close-ok is never dropped
    assert gate.qsize() == 2
    gate.get_nowait()
    gate.get_nowait()
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await channel.exchange_declare("amqpkit-compat-no-such-exchange", passive=True)
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        gate.put_nowait(publish_frame())  # the broker closed that channel: refused
    assert gate.empty()


async def test_a_raw_channel_without_confirms_can_have_its_returns_hooked(broker: Broker) -> None:
    channel = await broker.lowlevel.open_channel(confirms=False)
    try:
        assert aiormq_compat.returns_hookable(channel)
        returned: list[str | None] = []
        assert broker.lowlevel.hook_returns(channel, lambda m: returned.append(m.header.properties.message_id))
        await broker.lowlevel.publish_nowait(
            channel,
            b"x",
            routing_key="amqpkit.no-such-queue",
            mandatory=True,
            properties=aiormq.spec.Basic.Properties(message_id="m1"),
        )
        deadline = time.monotonic() + 5
        while not returned and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert returned == ["m1"]
    finally:
        await channel.close()


async def test_rpc_runs_on_the_fast_return_path(broker: Broker, name: str) -> None:
    """The client's channel has no publisher confirms, and a request no queue takes still fails at once."""
    server = RpcServer(broker, Queue(name, auto_delete=True))

    @server.method("add")
    async def add(pair: list[int]) -> int:
        return pair[0] + pair[1]

    async with server, RpcClient(broker, name) as client:
        assert await client.call("add", [1, 2], returns=int) == 3
        assert client.fast_returns, "the RPC client fell back to confirming each request"
        assert client.fast_replies, "the RPC client fell back to a task per direct reply"
        started = time.monotonic()
        with pytest.raises(NoResponder):
            await RpcClient(broker, f"{name}.nobody", timeout=10).call("add", [1, 1])
        assert time.monotonic() - started < 5  # the return, not the deadline, ended it


async def test_the_fallback_is_seen_when_the_hook_cannot_be_set(
    broker: Broker, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the hook the client still works, on confirms, and says so through ``fast_returns``."""
    monkeypatch.setattr(aiormq_compat, "hook_returns", lambda channel, callback: False)
    server = RpcServer(broker, Queue(name, auto_delete=True))

    @server.method("add")
    async def add(pair: list[int]) -> int:
        return pair[0] + pair[1]

    async with server, RpcClient(broker, name) as client:
        assert await client.call("add", [2, 2], returns=int) == 4
        assert not client.fast_returns
