"""A Delivery says it is settled only once the settlement was written (issue 10)."""

from __future__ import annotations

import asyncio

import pytest

from amqpkit import Broker, ConnectionLost, Delivery, Envelope, Queue, SettlementError, TopologyError
from amqpkit.message import Settlement

from .waiting import until_ready


async def _get(broker: Broker, queue: str) -> Delivery[bytes]:
    got = await broker.get(queue)
    assert got is not None
    return got


async def _close_the_get_channel(broker: Broker, name: str) -> None:
    """A basic.get on a queue that does not exist: the broker closes the channel the deliveries came on."""
    with pytest.raises(TopologyError, match="NOT_FOUND"):
        await broker.get(f"{name}.missing")


async def test_an_ack_on_a_closed_channel_leaves_the_delivery_unsettled(
    broker: Broker, name: str, cleanup: list[str]
) -> None:
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    await broker.publish(Envelope(b"one"), routing_key=name)
    delivery = await _get(broker, name)
    decoded = delivery.with_value("one")
    await _close_the_get_channel(broker, name)

    with pytest.raises(ConnectionLost):
        await delivery.ack()
    # Nothing was written: the delivery does not claim an ack the broker never got.
    assert delivery.settled is None
    assert decoded.settled is None
    assert "settled=None" in repr(delivery)
    # Still unsettled, so another try is a settlement attempt (that fails the same way), not a double settle.
    with pytest.raises(ConnectionLost):
        await decoded.nack(requeue=False)
    with pytest.raises(ConnectionLost):
        await delivery.reject()
    assert delivery.settled is None

    # The broker took the message back when the channel closed; it is delivered again and settles normally.
    await until_ready(broker, name, 1)
    again = await _get(broker, name)
    assert again.body == b"one" and again.redelivered
    await again.ack()
    assert again.settled is Settlement.ACKED
    assert await broker.queue_counts(name) == (0, 0)


async def test_concurrent_settlements_one_wins_the_other_raises(broker: Broker, name: str, cleanup: list[str]) -> None:
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    await broker.publish(Envelope(b"two"), routing_key=name)
    delivery = await _get(broker, name)
    results = await asyncio.gather(
        delivery.ack(), delivery.with_value("two").nack(requeue=True), return_exceptions=True
    )
    assert results[0] is None
    assert isinstance(results[1], SettlementError)
    assert delivery.settled is Settlement.ACKED
    with pytest.raises(SettlementError, match="already settled"):
        await delivery.ack()
    # The ack went out: the message does not come back.
    await _close_the_get_channel(broker, name)
    assert await broker.queue_counts(name) == (0, 0)
