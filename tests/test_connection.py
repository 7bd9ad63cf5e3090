"""The Broker against the real RabbitMQ: connect, declare, publish, consume, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest
from pydantic import BaseModel

from amqpkit import (
    AccessRefused,
    Binding,
    Broker,
    BrokerSettings,
    BytesCodec,
    Codec,
    ConnectError,
    Delivery,
    Envelope,
    Exchange,
    JsonCodec,
    MessageTooLarge,
    PublishError,
    PydanticCodec,
    Queue,
    ReconnectPolicy,
    SettlementError,
    TextCodec,
    TopologyError,
    Unroutable,
)

from .brokerctl import close_connections
from .reliability.proxy import FaultProxy
from .waiting import until


class Order(BaseModel):
    id: int
    item: str


async def test_connect_reports_the_broker(broker: Broker) -> None:
    product, version = broker.server_product
    assert product == "RabbitMQ"
    assert version.count(".") >= 1
    assert broker.is_connected


async def test_connect_failure_names_host_and_port_not_password(caplog: pytest.LogCaptureFixture) -> None:
    settings = BrokerSettings(
        url="amqp://guest:Sup3rSecret@127.0.0.1:1/",
        connect_timeout=2,
        reconnect=ReconnectPolicy(initial_delay=0.01, max_delay=0.02, connect_attempts=2),
    )
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConnectError) as info:
        async with Broker(settings):
            pass
    text = str(info.value)
    assert "127.0.0.1:1" in text
    assert "after 2 attempts" in text
    assert "Sup3rSecret" not in text
    assert "Sup3rSecret" not in repr(info.value)
    assert "Sup3rSecret" not in caplog.text


async def test_wrong_password_is_a_connect_error(amqp_url: str, caplog: pytest.LogCaptureFixture) -> None:
    from yarl import URL

    url = str(URL(amqp_url).with_password("Wr0ngPassw0rd"))
    settings = BrokerSettings(url=url, reconnect=ReconnectPolicy(initial_delay=0.01, connect_attempts=1))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConnectError) as info:
        await Broker(settings).connect()
    assert "Wr0ngPassw0rd" not in str(info.value)
    assert "Wr0ngPassw0rd" not in caplog.text


async def test_second_url_is_tried(amqp_url: str) -> None:
    settings = BrokerSettings(
        url=["amqp://guest:guest@127.0.0.1:1/", amqp_url],
        reconnect=ReconnectPolicy(initial_delay=0.01, connect_attempts=1),
    )
    async with Broker(settings) as broker:
        assert broker.is_connected


async def test_a_url_that_refuses_the_login_does_not_stop_the_others(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """connect() raised AccessRefused at the first URL that refused the login (a node with other credentials, an
    old password in one entry) and never tried the next; it tries every URL, and says the refusal once all do."""
    from yarl import URL

    wrong = str(URL(amqp_url).with_password("Wr0ngPassw0rd"))
    policy = ReconnectPolicy(initial_delay=0.01, connect_attempts=2)
    caplog.set_level(logging.DEBUG)
    async with Broker(BrokerSettings(url=[wrong, amqp_url], reconnect=policy)) as broker:
        assert broker.is_connected
        assert broker.access_refused is None
    with pytest.raises(AccessRefused) as info:
        await Broker(BrokerSettings(url=[wrong, wrong.replace("127.0.0.1", "localhost")], reconnect=policy)).connect()
    assert "after 2 attempts" in str(info.value)  # each URL once: a refusal does not get better by waiting
    assert "Wr0ngPassw0rd" not in str(info.value) and "Wr0ngPassw0rd" not in caplog.text


async def test_declare_is_idempotent(broker: Broker, name: str, cleanup: list[str]) -> None:
    ex = Exchange(f"{name}.x", type="topic")
    q = Queue(f"{name}.q", type="quorum", delivery_limit=3)
    cleanup += [f"q:{q.name}", f"x:{ex.name}"]
    for _ in range(3):
        await broker.declare(ex, q, Binding(ex, q, routing_key="a.#"))
    assert await broker.queue_counts(q) == (0, 0)


async def test_argument_drift_names_queue_and_argument(broker: Broker, name: str, cleanup: list[str]) -> None:
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name, message_ttl=1.0))
    with pytest.raises(TopologyError) as info:
        await broker.declare_queue(Queue(name, message_ttl=2.0))
    assert info.value.name == name
    assert info.value.argument == "x-message-ttl"
    assert name in str(info.value)
    assert "x-message-ttl" in str(info.value)
    # The connection is still usable, and so is the queue.
    await broker.publish(Envelope(b"still fine"), routing_key=name)
    got = await _get(broker, name)
    assert got.body == b"still fine"
    await got.ack()


async def test_queue_type_drift(broker: Broker, name: str, cleanup: list[str]) -> None:
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    with pytest.raises(TopologyError) as info:
        await broker.declare_queue(Queue(name, type="quorum"))
    assert info.value.argument == "x-queue-type"


async def test_server_named_queue(broker: Broker) -> None:
    q = Queue(exclusive=True, auto_delete=True, durable=False)
    live = await broker.declare_queue(q)
    assert live.startswith("amq.gen-")
    assert broker.queue_name(q) == live


async def test_a_queue_consume_declared_that_goes_with_its_consumer_is_forgotten_at_cancel(
    broker: Broker, name: str, cleanup: list[str]
) -> None:
    """consume() declared and remembered such a queue, and cancel() never forgot it: every reconnect declared each
    one again, for nobody (300 consume-and-cancel cycles: 300 queues more at each reconnect, in a hunt)."""

    async def callback(delivery: Delivery[bytes]) -> None:
        await delivery.ack()

    for queue in (  # none transient and shared: RabbitMQ 4.x refuses those (a deprecated feature)
        Queue(exclusive=True, auto_delete=True, durable=False),
        Queue(auto_delete=True),
        Queue(f"{name}.auto", auto_delete=True),
    ):
        consumer = await broker.consume(queue, callback)
        assert broker.remembers(queue)
        await consumer.cancel()
        assert not broker.remembers(queue), queue
    # A named queue that outlives its consumer stays remembered, as one declared before consume() does.
    kept = Queue(f"{name}.kept", auto_delete=False)
    cleanup.append(f"q:{kept.name}")
    consumer = await broker.consume(kept, callback)
    await consumer.cancel()
    assert broker.remembers(kept)
    # Two consumers of one such queue: forgotten with the last.
    shared = Queue(f"{name}.shared", exclusive=True, durable=False)
    first = await broker.consume(shared, callback)
    second = await broker.consume(shared, callback)
    await first.cancel()
    assert broker.remembers(shared)
    await second.cancel()
    assert not broker.remembers(shared)


@pytest.mark.parametrize(
    ("codec", "value"),
    [
        (BytesCodec(), b"\x00\x01bytes"),
        (TextCodec(), "text ünïcode"),
        (JsonCodec(), {"n": 1, "l": [1, "two"]}),
        (PydanticCodec(Order), Order(id=7, item="lamp")),
    ],
)
async def test_publish_and_get_with_each_codec(
    broker: Broker, name: str, cleanup: list[str], codec: Codec[Any], value: Any
) -> None:
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    env = Envelope(codec.encode(value), content_type=codec.content_type, headers={"k": "v"}, type="t")
    await broker.publish(env, routing_key=name)
    got = await _get(broker, name)
    assert codec.decode(got.body, got.envelope.content_type) == value
    assert got.envelope.message_id == env.message_id
    assert got.headers["k"] == "v"
    assert got.envelope.type == "t"
    assert got.envelope.persistent
    await got.ack()


async def test_message_too_large(settings: BrokerSettings, name: str) -> None:
    small = settings.model_copy(update={"max_message_size": 1024})
    async with Broker(small) as broker:
        with pytest.raises(MessageTooLarge) as info:
            await broker.publish(Envelope(b"x" * 1025), routing_key=name)
        assert info.value.size == 1025
        assert info.value.limit == 1024
        await broker.publish(Envelope(b"x" * 1024), routing_key=name)  # at the limit is fine (and dropped)


async def test_mandatory_unroutable(broker: Broker, name: str) -> None:
    with pytest.raises(Unroutable) as info:
        await broker.publish(Envelope(b"x"), routing_key=f"{name}.nowhere", mandatory=True)
    assert info.value.routing_key == f"{name}.nowhere"


async def test_publish_to_missing_exchange(broker: Broker, name: str) -> None:
    with pytest.raises(PublishError, match="NOT_FOUND"):
        await broker.publish(Envelope(b"x"), exchange=f"{name}.missing", routing_key="k")
    # the publish channel comes back for the next publish
    await broker.publish(Envelope(b"x"), routing_key=f"{name}.drop")


async def test_double_settlement_raises(broker: Broker, name: str, cleanup: list[str]) -> None:
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    await broker.publish(Envelope(b"once"), routing_key=name)
    got = await _get(broker, name)
    await got.ack()
    with pytest.raises(SettlementError, match="already settled"):
        await got.ack()
    with pytest.raises(SettlementError):
        await got.nack()
    decoded = got.with_value("once")
    with pytest.raises(SettlementError):
        await decoded.reject()


async def test_nack_requeue_counts_attempts_on_quorum(broker: Broker, name: str, cleanup: list[str]) -> None:
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name, type="quorum"))
    await broker.publish(Envelope(b"x"), routing_key=name)
    first = await _get(broker, name)
    assert first.attempt == 1
    await first.nack(requeue=True)
    second = await _get(broker, name)
    assert second.redelivered
    assert second.attempt == 2
    await second.ack()


@pytest.mark.whole_broker(vhost_only=True)
async def test_consume_and_reconnect_after_close_all_connections(
    settings: BrokerSettings, amqp_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """20 cuts in a row: topology and consumer come back, and a message sent after each cut arrives."""
    rounds = 20
    deadline = settings.heartbeat + 5
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def handler(delivery: Delivery[bytes]) -> None:
        await received.put(delivery.body)
        await delivery.ack()

    ex = Exchange(f"{name}.x", type="direct", durable=False, auto_delete=True)
    private = Queue(exclusive=True, auto_delete=True, durable=False)
    caplog.set_level(logging.WARNING)
    async with Broker(settings) as broker:
        await broker.declare(ex, Binding(ex, private, routing_key="k"))
        consumer = await broker.consume(private, handler, prefetch=10)
        for i in range(rounds):
            generation = broker.generation
            await close_connections(amqp_url, "amqpkit reconnect test")
            loop = asyncio.get_running_loop()
            started = loop.time()
            while broker.generation == generation or not consumer.attached.is_set():
                assert loop.time() - started < deadline, f"round {i}: consumer not back within {deadline} s"
                await asyncio.sleep(0.02)
            # The exchange and binding were re-declared (the exchange is auto-delete,
            # the queue exclusive: both vanished with the old connection).
            body = f"after cut {i}".encode()
            await broker.publish(Envelope(body), exchange=ex, routing_key="k", mandatory=True)
            assert await asyncio.wait_for(received.get(), timeout=deadline) == body
        assert broker.reconnects == rounds
    ours = [r for r in caplog.records if r.name.startswith("amqpkit")]
    assert not [r for r in ours if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.whole_broker(vhost_only=True)
async def test_publish_waits_for_reconnect(settings: BrokerSettings, amqp_url: str, name: str) -> None:
    async with Broker(settings) as broker:
        q = Queue(name, auto_delete=False)
        await broker.declare_queue(q)
        try:
            await close_connections(amqp_url, "amqpkit publish test")
            # Published while the connection is down or coming back: it must not be dropped.
            await broker.publish(Envelope(b"kept"), routing_key=name)
            got = await _get(broker, name)
            assert got.body == b"kept"
            await got.ack()
        finally:
            await broker.delete_queue(name)


async def _get(broker: Broker, queue: str, timeout: float = 5) -> Delivery[bytes]:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        got = await broker.get(queue)
        if got is not None:
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing arrived in {queue} within {timeout} s")


async def test_publish_before_connect_fails_at_once(settings: BrokerSettings) -> None:
    from amqpkit import ConnectionLost

    with pytest.raises(ConnectionLost, match="not connected"):
        await Broker(settings).publish(Envelope(b"x"), routing_key="nowhere")


async def test_a_get_given_up_in_flight_leaves_the_message_on_its_queue(
    broker: Broker, name: str, cleanup: list[str], proxy: FaultProxy, proxied: BrokerSettings
) -> None:
    """A get cancelled after the broker handed the message over, before the answer arrived, gives it back.

    Through a proxy delaying every chunk 0.3 s each way, the get is cancelled 0.45 s in: the broker has
    given the message to the get's channel, and its answer is still on the way. That channel is shared by
    every get; kept open, it would hold the message unacknowledged until the connection closed. aiormq
    closes a channel whose call was cancelled (amqpkit relies on it here; this checks it still does), and
    the next get opens another.
    """
    cleanup.extend([f"q:{name}", f"q:{name}.empty"])
    await broker.declare_queue(Queue(name))
    await broker.declare_queue(Queue(f"{name}.empty"))
    await broker.publish(Envelope(b"only one"), routing_key=name)
    async with Broker(proxied) as slow:
        assert await slow.get(f"{name}.empty") is None  # opens the get channel before the proxy is slowed
        proxy.latency = 0.3
        getting = asyncio.ensure_future(slow.get(name))
        await asyncio.sleep(0.45)
        getting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await getting
        proxy.latency = 0.0

        async def back() -> bool:
            ready, _ = await broker.queue_counts(name)
            return ready == 1

        await until(back, 5)  # held by the get channel before: 0 ready until the connection closed
        again = await slow.get(name, auto_ack=True)  # and the shared get channel still works
        assert again is not None and again.body == b"only one"
