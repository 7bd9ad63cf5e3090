"""A vhost with a default queue type (``add_vhost --default-queue-type``, ``update_vhost_metadata``).

An operator may give a vhost a default queue type: RabbitMQ then makes every durable queue declared there without
an ``x-queue-type`` a quorum queue, or a stream. amqpkit's queues by name (an ``RpcServer``'s, a shared
``Subscriber``'s, any ``Queue(name)``) are classic queues, and what amqpkit does with them depends on it: a
stream hands every consumer every message from where it attaches, and keeps them; a quorum queue refuses
``x-max-priority``. They are declared with ``x-queue-type: classic``, so the vhost's default changes nothing.
Each test makes the default itself, on the test's own vhost; on 3.10 and 4.x alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from amqpkit import (
    Binding,
    Broker,
    BrokerSettings,
    Delivery,
    Envelope,
    Exchange,
    PublishNacked,
    Queue,
    RpcClient,
    RpcError,
    RpcServer,
    Subscriber,
    TopologyError,
)
from amqpkit.errors import ConnectionLost
from amqpkit.testing import own_vhost

from .brokerctl import (
    close_connections,
    default_queue_type,
    made_vhost,
    queue_type,
    set_default_queue_type,
    vhost_of,
    with_vhost,
)
from .waiting import until_ready, wait_for


@pytest.fixture
def amqp_url(amqp_url: str) -> Iterator[str]:
    """The test's own vhost: a default queue type is the vhost's, and outlives the test on one shared with others
    (``AMQPKIT_TEST_VHOST=0``), where these tests make a vhost of their own instead."""
    if own_vhost(amqp_url):
        yield amqp_url
        return
    with made_vhost("amqpkit-dqt") as vhost:
        yield with_vhost(amqp_url, vhost)


async def _call_until_answered(client: RpcClient, value: int, within: float) -> int:
    """``echo(value)``, tried again while the connection comes back or nothing answers; fails past ``within``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while True:
        try:
            return int(await client.call("echo", value, timeout=1.5))
        except (RpcError, ConnectionLost):
            if loop.time() > end:
                raise
            await asyncio.sleep(0.1)


async def test_queues_by_name_keep_their_consumers_when_the_vhost_default_changes(
    broker: Broker, settings: BrokerSettings, amqp_url: str, name: str
) -> None:
    """The default set while amqpkit runs: its reconnect, and a second process, declare the same queues again.

    Declared without a type, a classic queue made before the change is then declared as the new type, and
    refused (406 inequivalent arg 'x-queue-type'): the RpcServer and the Subscriber stopped for good at the
    first reconnect, and a second instance could not start."""
    events = Exchange(f"{name}.events", type="fanout")
    got: list[int] = []

    async def on_event(n: int) -> None:
        got.append(n)

    server = RpcServer(broker, f"{name}.rpc")

    @server.method("echo")
    async def echo(x: int) -> int:
        return x

    async with server, Subscriber(broker, events, on_event, queue=f"{name}.shared") as sub:
        async with RpcClient(broker, f"{name}.rpc") as client:
            assert await client.call("echo", 1, timeout=10) == 1
            await set_default_queue_type(vhost_of(amqp_url), "quorum")
            assert await default_queue_type(vhost_of(amqp_url)) == "quorum"
            await close_connections(amqp_url, "the vhost's default queue type changed")
            assert await _call_until_answered(client, 2, within=20) == 2
            assert server.error is None, server.error
            await broker.publish(Envelope(b"3", content_type="application/json"), exchange=events)
            await wait_for(lambda: got == [3] or sub.error is not None, timeout=15)
            assert sub.error is None, sub.error
            assert got == [3]

        async with Broker(settings) as other:  # another instance, started after the change
            second = RpcServer(other, f"{name}.rpc")
            second.add("echo", echo)
            async with second, Subscriber(other, events, on_event, queue=f"{name}.shared"):
                pass
    assert await queue_type(amqp_url, f"{name}.rpc") == "classic"
    assert await queue_type(amqp_url, f"{name}.shared") == "classic"


async def test_a_shared_subscription_in_a_stream_default_vhost_is_a_queue(
    broker: Broker, amqp_url: str, name: str
) -> None:
    """Made a stream, the shared queue handed each new consumer only what came after it attached (what it held
    was never delivered) and every consumer every message (competing consumers each got all)."""
    await set_default_queue_type(vhost_of(amqp_url), "stream")
    events = Exchange(f"{name}.events", type="fanout")
    got: list[list[int]] = [[], []]

    def handler(i: int):  # type: ignore[no-untyped-def]
        async def on_event(n: int) -> None:
            got[i].append(n)

        return on_event

    first = Subscriber(broker, events, handler(0), queue=f"{name}.shared", prefetch=10)
    await first.declare()
    for n in range(5):
        await broker.publish(Envelope(str(n).encode(), content_type="application/json"), exchange=events)
    async with first, Subscriber(broker, events, handler(1), queue=f"{name}.shared", prefetch=10):
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: len(got[0]) >= 5, timeout=5)
        assert sorted(got[0]) == [0, 1, 2, 3, 4], got
        for n in range(5, 25):
            await broker.publish(Envelope(str(n).encode(), content_type="application/json"), exchange=events)
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: len(got[0]) + len(got[1]) >= 25, timeout=10)
        await asyncio.sleep(0.5)  # a copy handed to both would be here by now
        assert sorted(got[0] + got[1]) == list(range(25)), got
    assert await queue_type(amqp_url, f"{name}.shared") == "classic"


async def test_rpc_requests_in_a_stream_default_vhost_run_once(broker: Broker, amqp_url: str, name: str) -> None:
    """Made a stream, the request queue handed each of two servers every request: each ran twice."""
    await set_default_queue_type(vhost_of(amqp_url), "stream")
    runs: list[int] = []

    async def echo(x: int) -> int:
        runs.append(x)
        return x

    servers = [RpcServer(broker, f"{name}.rpc", handlers={"echo": echo}) for _ in range(2)]
    async with servers[0], servers[1], RpcClient(broker, f"{name}.rpc") as client:
        results = await asyncio.gather(*(client.call("echo", n, timeout=10) for n in range(10)))
        assert results == list(range(10))
        await asyncio.sleep(0.5)  # a second run of a request would be here by now
    assert sorted(runs) == list(range(10)), runs
    assert await queue_type(amqp_url, f"{name}.rpc") == "classic"


async def test_a_priority_queue_in_a_quorum_default_vhost(broker: Broker, amqp_url: str, name: str) -> None:
    """``x-max-priority`` is a classic queue's: declared as a quorum queue, it was refused (406 invalid arg)."""
    await set_default_queue_type(vhost_of(amqp_url), "quorum")
    events = Exchange(f"{name}.events", type="fanout")
    queue = Queue(f"{name}.prio", arguments={"x-max-priority": 5})
    sub = Subscriber(broker, events, queue=queue, prefetch=1)
    await sub.declare()
    for n, priority in ((1, 0), (2, 5), (3, 1)):
        await broker.publish(
            Envelope(str(n).encode(), content_type="application/json", priority=priority), exchange=events
        )
    got: list[int] = []
    async with sub:
        async for delivery in sub:
            assert isinstance(delivery, Delivery)
            got.append(delivery.value)
            await delivery.ack()
            if len(got) == 3:
                break
    assert got == [2, 3, 1]
    assert await queue_type(amqp_url, f"{name}.prio") == "classic"


async def test_reject_publish_dlx_in_a_quorum_default_vhost_refuses_the_newest(
    broker: Broker, amqp_url: str, name: str
) -> None:
    """``reject-publish-dlx`` is a classic queue's: a quorum queue takes it as ``drop-head``, so the publish past
    the limit was confirmed and the oldest message dropped (dead-lettered) in its place, without a word."""
    await set_default_queue_type(vhost_of(amqp_url), "quorum")
    dlx = Exchange(f"{name}.dlx", type="fanout")
    dead = Queue(f"{name}.dead")
    limited = Queue(f"{name}.limited", max_length=2, overflow="reject-publish-dlx", dead_letter_exchange=dlx.name)
    await broker.declare_exchange(dlx)
    await broker.bind(Binding(dlx, dead))
    await broker.declare_queue(limited)
    for body in (b"1", b"2"):
        await broker.publish(Envelope(body), routing_key=limited.name)
    with pytest.raises(PublishNacked):
        await broker.publish(Envelope(b"3"), routing_key=limited.name)
    kept = []
    while (got := await broker.get(limited.name)) is not None:
        kept.append(got.body)
        await got.ack()
    assert kept == [b"1", b"2"]
    await until_ready(broker, dead.name, 1)
    first_dead = await broker.get(dead.name)
    assert first_dead is not None and first_dead.body == b"3"
    await first_dead.ack()
    assert await queue_type(amqp_url, limited.name) == "classic"


async def test_a_queue_the_default_made_another_type_is_refused_saying_which(
    broker: Broker, amqp_url: str, name: str
) -> None:
    """A queue of the name that is already a quorum queue (made by the vhost's default for another client, or an
    earlier amqpkit) is not taken for a classic one: a TopologyError at start, naming the type to declare."""
    await set_default_queue_type(vhost_of(amqp_url), "quorum")
    await broker.declare_queue(Queue(f"{name}.rpc", type="quorum"))
    server = RpcServer(broker, f"{name}.rpc", handlers={"echo": lambda x: x})
    with pytest.raises(TopologyError) as caught:
        await server.start()
    assert caught.value.argument == "x-queue-type"
    # the type itself, unless the broker cut its text short (3.10's, with long names)
    assert "type='quorum')" in str(caught.value) or "type=...)" in str(caught.value), caught.value
    quorum = RpcServer(broker, Queue(f"{name}.rpc", type="quorum"), handlers={"echo": lambda x: x})
    async with quorum, RpcClient(broker, f"{name}.rpc") as client:
        assert await client.call("echo", 4, timeout=10) == 4


async def test_the_bench_s_bare_oneway_consumer_reads_a_classic_queue_too(amqp_url: str, name: str) -> None:
    """``raw-oneway``, the bare-aiormq baseline amqpkit's one-way consumer is compared with, declared its queue
    without a type: a quorum queue under a default of quorum (the two compared on different queue types), and
    under a default of stream a stream, whose no-ack consume made the broker close the connection."""
    from amqpkit.bench.base import ServerOptions
    from amqpkit.bench.servers import RawOnewayConsumer

    await set_default_queue_type(vhost_of(amqp_url), "stream")
    side = RawOnewayConsumer(ServerOptions(url=amqp_url, queue=f"{name}.oneway"))
    await side.start()
    try:
        assert await queue_type(amqp_url, f"{name}.oneway") == "classic"
    finally:
        await side.stop()
