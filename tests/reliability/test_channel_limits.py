"""Limits on channels that someone else set: a user's ``max-channels``, a connection's ``channel_max``.

RabbitMQ answers a channel past either limit by closing the whole connection (530 NOT_ALLOWED). Before
amqpkit knew, a Broker with one consumer too many reconnected for ever: every reconnect opened the same
channels again, the broker closed the connection again, and every consumer and publisher on it was cut each
time (a consumer's start waited for ever). Now whatever asked for the channel gets ChannelLimitReached, the
rest of the Broker comes back and stays up, and nothing waiting in a queue is lost.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from amqpkit import Broker, ChannelLimitReached, Consumer, Delivery, Envelope, Queue, ReconnectPolicy
from amqpkit.settings import BrokerSettings

from ..brokerctl import rabbitmqctl, vhost_of
from ..waiting import wait_for
from .proxy import FaultProxy

PASSWORD = f"Pw-{uuid.uuid4().hex[:12]}"
FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.5, jitter=0.1)


@pytest.fixture
def user(amqp_url: str) -> Iterator[str]:
    """A user of this test's vhost only, whose limits the test sets."""
    name = f"amqpkit-limits-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_user", name, PASSWORD)
    try:
        rabbitmqctl("set_permissions", "-p", vhost_of(amqp_url), name, ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_user", name)


def limit_channels(user: str, most: int) -> None:
    rabbitmqctl("set_user_limits", user, json.dumps({"max-channels": most}))


class Counting:
    """A consumer's deliveries, by message id."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    async def __call__(self, delivery: Delivery[bytes]) -> None:
        self.ids.add(delivery.envelope.message_id or "")
        await delivery.ack()


async def round_trip(broker: Broker, queue: str, counting: Counting) -> None:
    """A message to ``queue`` reaches its consumer."""
    message_id = uuid.uuid4().hex
    await broker.publish(Envelope(b"x", message_id=message_id), routing_key=queue)
    await wait_for(lambda: message_id in counting.ids, 10)


async def stays_up(broker: Broker, seconds: float) -> None:
    """No reconnect for ``seconds`` (before, the Broker reconnected about every backoff delay, for ever)."""
    reconnects = broker.reconnects
    await asyncio.sleep(seconds)
    assert broker.is_connected
    assert broker.reconnects == reconnects, f"{broker.reconnects - reconnects} reconnects in {seconds} s"


async def test_a_consumer_past_the_users_channel_limit_fails_and_the_rest_stay_up(
    broker: Broker, amqp_url: str, user: str, name: str
) -> None:
    queues = [f"{name}.{i}" for i in range(8)]
    for queue in queues:
        await broker.declare_queue(Queue(queue))
    limit_channels(user, 4)
    parts = urlsplit(amqp_url)
    url = urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{parts.hostname}:{parts.port}"))
    attached: list[tuple[str, Counting]] = []
    async with Broker(BrokerSettings(url=url, reconnect=FAST, heartbeat=5)) as limited:
        refused: ChannelLimitReached | None = None
        for queue in queues:
            counting = Counting()
            try:  # before: the start of the consumer past the limit waited for ever
                await asyncio.wait_for(limited.consume(Queue(queue), counting, declare=False), 10)
            except ChannelLimitReached as exc:
                refused = exc
                break
            attached.append((queue, counting))
        assert refused is not None, "every consumer fitted: the limit was not reached"
        assert "max" in str(refused) and PASSWORD not in str(refused)
        assert 1 <= len(attached) < 4
        print(f"{len(attached)} consumers fitted; reconnects {limited.reconnects}")
        await wait_for(lambda: limited.is_connected, 10)
        await stays_up(limited, 3)
        for queue, counting in attached:
            await round_trip(limited, queue, counting)
        assert all(c.attached.is_set() for c in limited.consumers)
        assert len(limited.consumers) == len(attached)
        # what waits in the refused consumer's queue stays there
        over = queues[len(attached)]
        await broker.publish(Envelope(b"kept", message_id="kept"), routing_key=over)
        got = await broker.get(over, auto_ack=True)
        assert got is not None and got.envelope.message_id == "kept"
    for queue in queues:
        await broker.delete_queue(queue)


async def test_consumers_that_no_longer_fit_after_a_reconnect_stop_and_the_rest_come_back(
    broker: Broker, proxy: FaultProxy, user: str, name: str
) -> None:
    queues = [f"{name}.{i}" for i in range(4)]
    for queue in queues:
        await broker.declare_queue(Queue(queue))
    limit_channels(user, 16)
    errors: dict[str, BaseException] = {}
    countings: dict[str, Counting] = {}
    settings = BrokerSettings(url=proxy.url(user, PASSWORD), reconnect=FAST, heartbeat=2, connect_timeout=5)
    async with Broker(settings) as limited:
        consumers: dict[str, Consumer] = {}
        for queue in queues:
            countings[queue] = Counting()
            consumers[queue] = await limited.consume(
                Queue(queue), countings[queue], declare=False,
                on_error=lambda exc, queue=queue: errors.__setitem__(queue, exc),  # type: ignore[misc]
            )  # fmt: skip
        for queue in queues:
            await round_trip(limited, queue, countings[queue])
        # Lowered while connected: the broker leaves open channels alone, and counts them at the next open.
        limit_channels(user, 3)
        proxy.cut()
        took = await wait_for(lambda: len(errors) == 2, 15)  # before: reconnects for ever, no consumer told
        print(f"two consumers stopped {took:.1f} s after the cut")
        assert all(isinstance(exc, ChannelLimitReached) for exc in errors.values()), errors
        await wait_for(lambda: limited.is_connected, 10)
        await stays_up(limited, 3)
        fitted = [queue for queue in queues if queue not in errors]
        assert len(fitted) == 2
        for queue in fitted:
            assert consumers[queue].attached.is_set()
            await round_trip(limited, queue, countings[queue])
        for queue in errors:
            assert consumers[queue].cancelled and isinstance(consumers[queue].error, ChannelLimitReached)
        assert {c.queue_name for c in limited.consumers} == set(fitted)
    for queue in queues:
        await broker.delete_queue(queue)


@pytest.mark.whole_broker  # every new connection to the node gets the lowered channel_max while it runs
async def test_a_channel_past_the_connections_channel_max_is_refused_before_it_is_asked_for(
    broker: Broker, amqp_url: str, name: str
) -> None:
    """The negotiated ``channel_max`` is known from the handshake: the channel past it is refused by amqpkit,
    and the broker never closes the connection over it."""
    before = rabbitmqctl("eval", "application:get_env(rabbit, channel_max).").strip()
    queues = [f"{name}.{i}" for i in range(4)]
    for queue in queues:
        await broker.declare_queue(Queue(queue))
    rabbitmqctl("eval", "application:set_env(rabbit, channel_max, 3).")
    try:
        limited = Broker(BrokerSettings(url=amqp_url, reconnect=FAST, heartbeat=5))
        await limited.connect()
    finally:  # the node as it was for every other connection
        rabbitmqctl("eval", f"application:set_env(rabbit, channel_max, {before.removeprefix('{ok,').rstrip('}')}).")
    try:
        countings = [Counting() for _ in queues]
        refused: ChannelLimitReached | None = None
        for queue, counting in zip(queues, countings, strict=True):
            try:
                await asyncio.wait_for(limited.consume(Queue(queue), counting, declare=False), 10)
            except ChannelLimitReached as exc:
                refused = exc
                break
        assert refused is not None and refused.limit == 3
        assert limited.reconnects == 0 and limited.is_connected
        await stays_up(limited, 1)
        assert len(limited.consumers) == 2  # the publish channel and two consumers
        for consumer, counting in zip(limited.consumers, countings, strict=False):
            await round_trip(limited, consumer.queue_name, counting)
    finally:
        await limited.close()
    for queue in queues:
        await broker.delete_queue(queue)
