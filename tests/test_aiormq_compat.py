"""aiormq's internals amqpkit relies on (amqpkit.aiormq_compat) are there, and the fast paths built on them run.

An aiormq upgrade that renames one of them must fail here, not leave RPC on
its slower fallback (a confirm per request) without anyone noticing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import time
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import aiormq
import pamqp.frame
import pytest
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pamqp.commands import Channel as ChannelSpec
from pamqp.header import ContentHeader

from amqpkit import Broker, Delivery, Envelope, NoResponder, Queue, RpcClient, RpcServer, aiormq_compat


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
    # What the write queue joins frames with: the stdlib queue's deque, and aiormq's writer taking items with get.
    assert isinstance(asyncio.Queue()._queue, collections.deque)  # type: ignore[attr-defined]
    # What amqpkit.unreadable reads again when pamqp refuses a frame on one of amqpkit's connections.
    assert {"_unmarshal_header_frame", "_unmarshal_method_frame"} <= set(pamqp.frame.unmarshal.__code__.co_names)
    assert "unmarshal" in aiormq.connection.FrameReceiver.get_frame.__code__.co_names
    assert hasattr(pamqp.frame._unmarshal_header_frame, "__wrapped__")  # installed when amqpkit was imported
    assert "self.queue.get()" in inspect.getsource(aiormq.connection.FrameGenerator.__anext__)
    # What ClosedOnOpen wraps: the handshake's static _rpc, which reads each frame with frame_receiver.get_frame.
    assert isinstance(inspect.getattr_static(aiormq.Connection, "_rpc"), staticmethod)
    assert "frame_receiver.get_frame()" in inspect.getsource(aiormq.Connection._rpc)
    assert "self._rpc(" in inspect.getsource(aiormq.Connection.connect)
    # What AmqpConnection replaces to keep the reason of a block: the reader awaits the two handlers by these
    # mangled names, and aiormq's writer waits on the event they clear and set.
    reader = inspect.getsource(vars(aiormq.Connection)["_Connection__reader"])
    for handler in ("_Connection__handle_connection_blocked", "_Connection__handle_connection_unblocked"):
        assert inspect.iscoroutinefunction(getattr(aiormq.Connection, handler))
        assert handler.removeprefix("_Connection") in reader
    assert "self.__connection_unblocked" in inspect.getsource(aiormq.Connection.__init__)
    # What AmqpConnection.close turns into a lost connection: a reader cancelled by the heartbeat, closing
    # the connection with the CancelledError it raised.
    assert isinstance(inspect.getattr_static(aiormq.Connection, "is_connection_was_stuck"), property)
    assert "await self.close(exc)" in inspect.getsource(aiormq.Connection._on_reader_done)
    assert "self._reader_task.cancel()" in inspect.getsource(vars(aiormq.Connection)["_Connection__heartbeat"])


async def test_a_channel_the_broker_is_closing_is_seen_as_closing(broker: Broker) -> None:
    channel = await broker.lowlevel.open_channel()
    assert isinstance(getattr(channel, "_Channel__lock", None), asyncio.Lock)
    assert isinstance(channel.delivery_tag, int)  # type: ignore[attr-defined]
    assert isinstance(getattr(channel, "_Channel__close_event", None), asyncio.Event)
    assert not aiormq_compat.closing(channel)
    reader = getattr(channel, "_Channel__reader_task", None)  # closing() asks it whether it is done
    assert reader is not None and reader.done() is False
    assert "confirmation.set_exception" in inspect.getsource(aiormq.Channel._on_return_frame)  # guard_returns
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
    assert gate.get_nowait().payload == publish_frame().payload + close_ok.payload  # both, as one write
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


def _publish_frame(channel: aiormq.abc.AbstractChannel, body: bytes) -> ChannelFrame:
    frames: list[Any] = [Basic.Publish(exchange="", routing_key="q"), ContentHeader(body_size=len(body))]
    frames += channel._split_body(body)  # type: ignore[attr-defined]
    return ChannelFrame.marshall(channel_number=channel.number, frames=frames)


async def test_frames_waiting_together_go_to_the_writer_as_one_item(broker: Broker) -> None:
    conn = broker._conn
    assert conn is not None
    channel = await broker.lowlevel.open_channel()
    queue = aiormq_compat._WriteQueue(conn, 0)  # of its own, so the connection's writer does not drain it
    first = [_publish_frame(channel, b"a%d" % n) for n in range(3)]
    awaited = asyncio.get_running_loop().create_future()
    drained = ChannelFrame(payload=b"drain", should_close=False, drain_future=awaited)
    then = [_publish_frame(channel, b"b%d" % n) for n in range(2)]
    big = [_publish_frame(channel, bytes(aiormq_compat.COALESCE_BYTES // 2)) for _ in range(3)]
    for frame in (*first, drained, *then, *big):
        queue.put_nowait(frame)
    got = []
    while not queue.empty():
        got.append(await queue.get())
        queue.task_done()  # as aiormq's writer does, once per item it takes
    # In order; a frame whose writing someone awaits goes alone; and the joined writes stay bounded.
    assert [g.payload for g in got] == [
        b"".join(f.payload for f in first),
        b"drain",
        b"".join(f.payload for f in then) + big[0].payload,
        big[1].payload,
        big[2].payload,
    ]
    assert got[1] is drained
    await asyncio.wait_for(queue.join(), 1)  # every item put is accounted done


@contextlib.contextmanager
def _writes(conn: aiormq.Connection) -> Iterator[list[int]]:
    """The size of each item the connection's writer takes from its write queue (one socket write each)."""
    taken: list[int] = []
    original = conn.write_queue.get_nowait

    def counting() -> Any:
        item = original()
        taken.append(len(item.payload))
        return item

    conn.write_queue.get_nowait = counting  # type: ignore[method-assign]
    try:
        yield taken
    finally:
        del conn.write_queue.get_nowait


async def test_a_burst_of_publishes_is_written_in_fewer_writes_and_arrives_whole_in_order(
    broker: Broker, name: str
) -> None:
    conn = broker._conn
    assert conn is not None
    queue = Queue(f"{name}.q", auto_delete=True)
    await broker.declare_queue(queue)
    bodies = [b"%d:" % n + bytes(n * 37 % 300_000) for n in range(400)]  # up to a few frames each
    with _writes(conn) as taken:
        await asyncio.gather(*(broker.publish(Envelope(body=body), routing_key=queue.name, confirm=False)
                               for body in bodies))  # fmt: skip
        # The end marker goes on the burst's own channel: AMQP keeps order within a channel only. Confirmed, it
        # went on the confirm channel, and on RabbitMQ 4.0 it overtook the burst's last 115 messages (CI).
        await broker.publish(Envelope(body=b"end"), routing_key=queue.name, confirm=False)
        await asyncio.wait_for(conn.write_queue.join(), 30)  # every frame taken by the writer, so counted
    got: list[bytes] = []
    done = asyncio.Event()

    async def handle(delivery: Delivery[bytes]) -> None:
        got.append(delivery.body)
        await delivery.ack()
        if delivery.body == b"end":
            done.set()

    consumer = await broker.consume(queue, handle)
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await consumer.cancel()
    assert got == [*bodies, b"end"]
    assert len(taken) < len(bodies), f"{len(taken)} writes for {len(bodies)} publishes"  # one each before


async def test_confirmed_publishes_started_together_go_out_in_a_few_writes(broker: Broker, name: str) -> None:
    conn = broker._conn
    assert conn is not None
    queue = Queue(f"{name}.q", auto_delete=True)
    await broker.declare_queue(queue)
    await broker.publish(Envelope(body=b"first"), routing_key=queue.name)  # the publishing channel, opened
    with _writes(conn) as taken:
        # 64 publishers resumed in one turn, as a batch of confirms resumes them: before, each one past the
        # tenth waited for room holding the channel's lock, and the rest went one per turn, one write each.
        await asyncio.gather(*(broker.publish(Envelope(body=b"%d" % n), routing_key=queue.name) for n in range(64)))
    assert sum(taken) > 64 * 20  # every publish went through the counted queue (a method, header and body frame)
    assert len(taken) <= 8, f"{len(taken)} writes for 64 publishes"
    assert (await broker.queue_counts(queue.name))[0] == 65
