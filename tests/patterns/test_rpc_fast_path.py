"""What the RPC hot path does per call (issue 18: amqpkit's own overhead at one call in flight).

Each test pins one thing the fast path does or leaves out: properties not
sent, a timer not armed, the order in which the reply and the ack leave.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import pytest
from aiormq.abc import AbstractChannel, DeliveredMessage

from amqpkit import Broker, Delivery, Queue, RpcClient, RpcServer, aiormq_compat

from ..waiting import wait_for


async def _basic_get(broker: Broker, queue: str) -> DeliveredMessage:
    """One message of ``queue`` as the frame carries it (its raw AMQP properties)."""
    channel = await broker.lowlevel.open_channel()
    try:
        for _ in range(100):
            message = await channel.basic_get(queue, no_ack=True)
            if isinstance(message.delivery, aiormq.spec.Basic.GetOk):
                return message
            await asyncio.sleep(0.05)
        raise AssertionError(f"nothing arrived in {queue}")
    finally:
        await channel.close()


async def test_a_request_is_sent_without_a_delivery_mode(broker: Broker, name: str, cleanup: list[str]) -> None:
    """Transient is what no delivery mode means: the property is not encoded on every call."""
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))  # a queue nobody serves: the request waits there
    async with RpcClient(broker, name, timeout=5) as client:
        call = asyncio.create_task(client.call("echo", b"x", returns=bytes))
        request = await _basic_get(broker, name)  # taken while the call waits (it expires with the call)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    properties = request.header.properties
    assert properties.delivery_mode is None
    assert properties.message_id == properties.correlation_id  # its own id: aiormq makes none per call


async def test_a_reply_is_sent_without_a_delivery_mode_under_the_request_correlation_id(
    broker: Broker, name: str, cleanup: list[str]
) -> None:
    replies = f"{name}.replies"
    cleanup.append(f"q:{replies}")
    await broker.declare_queue(Queue(replies))
    server = RpcServer(broker, Queue(name, auto_delete=True))

    @server.method("echo")
    async def echo(body: bytes) -> bytes:
        return body

    async with server:
        properties = aiormq.spec.Basic.Properties(correlation_id="c-1", reply_to=replies, message_type="echo")
        channel = await broker.lowlevel.open_channel()
        try:
            await broker.lowlevel.publish_nowait(channel, b"hello", routing_key=name, properties=properties)
            reply = await _basic_get(broker, replies)
        finally:
            await channel.close()
    assert reply.body == b"hello"
    got = reply.header.properties
    assert got.delivery_mode is None
    # One reply per request: its id is the request's correlation id, not a random one made per reply.
    assert (got.correlation_id, got.message_id) == ("c-1", "c-1")


async def test_the_reply_leaves_before_the_request_is_acked(
    broker: Broker, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the server acks a request, its reply is no longer queued for the writer: the ack is not on the
    caller's path. (Before, the ack was built and queued first, and the reply went out after it.)"""
    queued_at_ack: list[int] = []
    original_ack = Delivery.ack

    async def ack(self: Delivery[Any]) -> None:
        channel = broker.lowlevel.channel_of(self)
        assert channel is not None
        queued_at_ack.append(channel.connection.write_queue.qsize())
        await original_ack(self)

    monkeypatch.setattr(Delivery, "ack", ack)
    server = RpcServer(broker, Queue(name, auto_delete=True))

    @server.method("echo")
    async def echo(body: bytes) -> bytes:
        return body

    async with server:
        async with Broker(broker.settings) as caller, RpcClient(caller, name, timeout=10) as client:
            for i in range(5):
                assert await client.call("echo", b"%d" % i, returns=bytes) == b"%d" % i
        await wait_for(lambda: len(queued_at_ack) == 5, 5)
    assert queued_at_ack == [0] * 5


async def test_a_server_task_cancelled_right_after_its_reply_still_acks(
    broker: Broker, name: str, cleanup: list[str]
) -> None:
    """The server yields once between queueing the reply and acking; a cancel landing there still acks,
    as it did when nothing came between them (a reply sent and its request delivered again would run twice)."""
    cleanup.append(f"q:{name}")
    server = RpcServer(broker, Queue(name))  # durable: it keeps what a lost ack would requeue
    calls = 0

    @server.method("echo")
    async def echo(body: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if body == b"cut":
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().call_soon(task.cancel)  # lands on the server's yield after the reply
        return body

    async with server:
        async with Broker(broker.settings) as caller, RpcClient(caller, name, timeout=10) as client:
            # The first reply opens the server's reply channel (a wait a cancel could land on): not this one.
            assert await client.call("echo", b"first", returns=bytes) == b"first"
            assert await client.call("echo", b"cut", returns=bytes) == b"cut"
        await asyncio.sleep(0.3)
    await asyncio.sleep(0.3)
    ready, _ = await broker.queue_counts(name)
    assert (calls, ready) == (2, 0)  # acked: not back in the queue once the server's channel closed


class _PublishSpy:
    """Records the timeout each publish is handed to aiormq with; ``forward=False`` sends nothing."""

    def __init__(self, *, forward: bool = True) -> None:
        self.timeouts: list[float | None] = []
        self.release: asyncio.Event | None = None
        self.forward = forward
        self.original = aiormq_compat.publish_nowait

    async def __call__(self, channel: AbstractChannel, body: bytes, **kwargs: Any) -> None:
        self.timeouts.append(kwargs.get("timeout"))
        if self.release is not None and len(self.timeouts) == 1:
            await self.release.wait()  # the first publish waits (as for room in a full write queue)
        if self.forward:
            await self.original(channel, body, **kwargs)


async def test_an_unconfirmed_publish_arms_no_timer_when_the_write_queue_has_room(
    broker: Broker, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _PublishSpy()
    monkeypatch.setattr(aiormq_compat, "publish_nowait", spy)
    properties = aiormq.spec.Basic.Properties()
    for _ in range(3):
        await broker.lowlevel.publish_unconfirmed(b"x", properties, routing_key=f"{name}.nowhere")
    assert spy.timeouts == [None, None, None]


async def test_an_unconfirmed_publish_is_bounded_when_the_write_queue_is_full(
    broker: Broker, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _PublishSpy(forward=False)  # aiormq's own put would wait on the queue said to be full
    monkeypatch.setattr(aiormq_compat, "publish_nowait", spy)
    properties = aiormq.spec.Basic.Properties()
    await broker.lowlevel.publish_unconfirmed(b"x", properties, routing_key=f"{name}.nowhere")  # opens its channel
    channel = await broker.lowlevel.open_channel()
    try:
        monkeypatch.setattr(channel.connection.write_queue, "full", lambda: True)
        await broker.lowlevel.publish_unconfirmed(b"x", properties, routing_key=f"{name}.nowhere")
        await broker.lowlevel.publish_unconfirmed(b"x", properties, routing_key=f"{name}.nowhere", timeout=3)
    finally:
        monkeypatch.undo()
        await channel.close()
    assert spy.timeouts == [None, broker.settings.publish_timeout, 3]


async def test_an_unconfirmed_publish_is_bounded_while_another_one_waits(
    broker: Broker, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish behind another one that waits may wait for the channel's lock: it keeps its timeout."""
    spy = _PublishSpy()
    spy.release = asyncio.Event()
    monkeypatch.setattr(aiormq_compat, "publish_nowait", spy)
    properties = aiormq.spec.Basic.Properties()
    first = asyncio.create_task(broker.lowlevel.publish_unconfirmed(b"1", properties, routing_key=f"{name}.nowhere"))
    await wait_for(lambda: len(spy.timeouts) == 1, 5)
    second = asyncio.create_task(broker.lowlevel.publish_unconfirmed(b"2", properties, routing_key=f"{name}.nowhere"))
    await wait_for(lambda: len(spy.timeouts) == 2, 5)
    spy.release.set()
    await asyncio.gather(first, second)
    assert spy.timeouts == [None, broker.settings.publish_timeout]
    await broker.lowlevel.publish_unconfirmed(b"3", properties, routing_key=f"{name}.nowhere")
    assert spy.timeouts[-1] is None  # the count of publishes in flight went back down


async def test_a_direct_reply_completes_its_call_without_a_task_per_reply(broker: Broker, name: str) -> None:
    """The reply is read from its frame and completes the call's future there: aiormq makes no task for it."""
    server = RpcServer(broker, Queue(name, auto_delete=True))

    @server.method("echo")
    async def echo(body: bytes) -> bytes:
        return body

    loop = asyncio.get_running_loop()
    made: list[str] = []
    default_factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made.append(getattr(coro, "__qualname__", ""))
        if default_factory is not None:
            return default_factory(loop, coro, **kwargs)  # type: ignore[return-value]
        return asyncio.Task(coro, loop=loop, **kwargs)

    async with server, RpcClient(broker, name, timeout=5) as client:
        assert await client.call("echo", b"warm", returns=bytes) == b"warm"
        loop.set_task_factory(counting)
        try:
            for n in range(20):
                assert await client.call("echo", str(n).encode(), returns=bytes) == str(n).encode()
        finally:
            loop.set_task_factory(default_factory)
        assert client.fast_replies, "the RPC client fell back to a task per reply"
    per_reply = [q for q in made if q.startswith("RpcClient.")]
    assert per_reply == [], f"{len(per_reply)} tasks for 20 replies: {sorted(set(per_reply))}"


class _BasicPublishCount:
    """Counts the publishes that went through aiormq's own ``Channel.basic_publish``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.routing_keys: list[str] = []
        original = aiormq.Channel.basic_publish

        async def counting(channel: aiormq.Channel, body: bytes, **kwargs: Any) -> Any:
            self.routing_keys.append(kwargs.get("routing_key", ""))
            return await original(channel, body, **kwargs)

        monkeypatch.setattr(aiormq.Channel, "basic_publish", counting)


async def test_a_publish_nothing_can_hold_up_is_queued_at_once_and_arrives_as_sent(
    broker: Broker, name: str, cleanup: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No confirms, the channel's lock free, room in the write queue: none of aiormq's publish machinery
    (two context managers, a timeout, the lock) could wait, so the frames are queued without it."""
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    count = _BasicPublishCount(monkeypatch)
    for n in range(3):
        properties = aiormq.spec.Basic.Properties(message_id=f"m{n}", content_type="text/plain", headers={"n": n})
        await broker.lowlevel.publish_unconfirmed(b"body %d" % n, properties, routing_key=name)
    got = [await _basic_get(broker, name) for _ in range(3)]
    seen = [(m.body, m.header.properties.message_id, m.header.properties.headers) for m in got]
    assert seen == [(b"body %d" % n, f"m{n}", {"n": n}) for n in range(3)]
    assert count.routing_keys == []


async def test_an_rpc_call_s_request_and_reply_skip_aiormq_s_publish(
    broker: Broker, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RpcServer(broker, Queue(name, auto_delete=True))

    @server.method("echo")
    async def echo(body: bytes) -> bytes:
        return body

    async with server, RpcClient(broker, name, timeout=5) as client:
        assert await client.call("echo", b"warm", returns=bytes) == b"warm"
        count = _BasicPublishCount(monkeypatch)
        for n in range(5):
            assert await client.call("echo", b"%d" % n, returns=bytes) == b"%d" % n
    assert count.routing_keys == []


async def test_a_publish_behind_the_channel_s_lock_waits_its_turn(
    broker: Broker, name: str, cleanup: list[str]
) -> None:
    """A publish that holds the lock (it waits for room in a full write queue) goes first: the next one on
    that channel waits for the lock as aiormq's does, instead of overtaking it."""
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    channel = await broker.lowlevel.open_channel(confirms=False)
    try:
        lock = channel._Channel__lock  # type: ignore[attr-defined]  # what a publish waiting for room holds
        await lock.acquire()
        properties = aiormq.spec.Basic.Properties(message_id="behind")
        behind = asyncio.create_task(
            aiormq_compat.publish_nowait(channel, b"behind", routing_key=name, properties=properties)
        )
        await asyncio.sleep(0.2)
        assert not behind.done(), "the publish overtook the one holding the channel's lock"
        lock.release()
        await asyncio.wait_for(behind, 5)
        assert (await _basic_get(broker, name)).body == b"behind"
    finally:
        await channel.close()


async def test_a_publish_on_a_confirming_channel_keeps_aiormq_s_bookkeeping(
    broker: Broker, name: str, cleanup: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With confirms, aiormq must number the publish and wait for its confirm: it goes through aiormq's."""
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    count = _BasicPublishCount(monkeypatch)
    channel = await broker.lowlevel.open_channel(confirms=True)
    try:
        await aiormq_compat.publish_nowait(channel, b"x", routing_key=name)
        assert (await _basic_get(broker, name)).body == b"x"
    finally:
        await channel.close()
    assert count.routing_keys == [name]


async def test_a_publish_on_a_channel_the_broker_is_closing_fails_and_sends_nothing(broker: Broker) -> None:
    generation = broker.generation
    channel = await broker.lowlevel.open_channel(confirms=False)
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await channel.exchange_declare("amqpkit-fast-path-no-such-exchange", passive=True)
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await aiormq_compat.publish_nowait(channel, b"x", routing_key="amqpkit.nowhere")
    # A frame sent after the close-ok makes the broker close the whole connection: a round trip on it
    # afterwards, and no reconnect, show that nothing went out.
    probe = await broker.lowlevel.open_channel()
    await probe.close()
    assert broker.is_connected and broker.generation == generation
