"""After a nack, Broker.publish moves to a fresh channel.

On a three-node RabbitMQ 3.10 cluster, a Broker that reconnected to a
surviving node within 0.2 s of a kill opened its publishing channel before
the quorum queue had elected its new leader; that channel then nacked every
publish to the queue for ten minutes (92,642 nacks in CI), while a channel
opened on the same node afterwards had the same publishes acked. A nack
says the channel could not hand the message over; the next publish goes on
a new channel, and the old one is closed once its confirms are in.
"""

from __future__ import annotations

import asyncio

import pytest

from amqpkit import Binding, Broker, Envelope, Exchange, ExchangeType, Overflow, PublishNacked, Queue, publishing

from .waiting import until


async def test_the_publish_after_a_nack_goes_on_a_new_channel(broker: Broker, name: str, cleanup: list[str]) -> None:
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name, max_length=1, overflow=Overflow.REJECT_PUBLISH))
    await broker.publish(Envelope(b"first"), routing_key=name)
    nacked_on = broker._channels["publish"]
    with pytest.raises(PublishNacked):
        await broker.publish(Envelope(b"second"), routing_key=name)
    assert broker._channels.get("publish") is not nacked_on
    await broker.purge_queue(name)
    await broker.publish(Envelope(b"after"), routing_key=name)  # confirmed, on the new channel
    assert broker._channels["publish"] is not nacked_on
    for _ in range(50):
        if nacked_on.is_closed:
            break
        await asyncio.sleep(0.1)
    assert nacked_on.is_closed


async def test_a_nacked_publish_is_sent_once_more_on_a_fresh_channel(
    broker: Broker, name: str, cleanup: list[str]
) -> None:
    """A failover's nack belongs to the channel (see above): the publish goes once more on a new one. A full queue
    nacks it again, and then it fails; within the second after a replacement a nack fails at once."""
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name, max_length=1, overflow=Overflow.REJECT_PUBLISH))
    await broker.publish(Envelope(b"first"), routing_key=name)
    first_channel = broker._channels["publish"]
    before = broker.republished
    with pytest.raises(PublishNacked):
        await broker.publish(Envelope(b"second"), routing_key=name)
    assert broker.republished == before + 1  # sent again, on another channel, and nacked again
    retried_on = broker._channels["publish"]
    assert retried_on is not first_channel
    with pytest.raises(PublishNacked):
        await broker.publish(Envelope(b"third"), routing_key=name)
    assert broker.republished == before + 1  # that channel is not replaced yet (one a second): no second try
    assert broker._channels["publish"] is retried_on
    assert (await broker.queue_counts(name))[0] == 1


async def test_a_nack_says_what_usually_refuses_a_publish(broker: Broker, name: str, cleanup: list[str]) -> None:
    """Before: "broker nacked the publish to ''" and nothing more. A policy someone else set (a length limit
    with overflow reject-publish) is what usually refuses one; the text says so, and where to look."""
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name, max_length=1, overflow=Overflow.REJECT_PUBLISH))
    await broker.publish(Envelope(b"first"), routing_key=name)
    with pytest.raises(PublishNacked) as nacked:
        await broker.publish(Envelope(b"second"), routing_key=name)
    text = str(nacked.value)
    assert "reject-publish" in text and "length limit" in text and "list_policies" in text, text


async def test_a_nack_says_the_other_queues_may_hold_it_twice(
    broker: Broker, name: str, cleanup: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nack is for the whole publish: routed to two queues and refused by one (full, reject-publish), the other
    took it, and took it again when it was sent once more. Before, the error read as if nothing had been
    delivered, and a caller retrying it added a third copy where two already were."""
    monkeypatch.setattr(publishing, "RETIRE_AT_MOST_EVERY", 60.0)  # the third publish within it, however slow
    kept, full = f"{name}.kept", f"{name}.full"
    cleanup.extend([f"q:{kept}", f"q:{full}", f"x:{name}"])
    exchange = Exchange(name, type=ExchangeType.FANOUT, durable=False, auto_delete=True)
    await broker.bind(Binding(exchange, Queue(kept)))
    await broker.bind(Binding(exchange, Queue(full, max_length=1, overflow=Overflow.REJECT_PUBLISH)))
    await broker.publish(Envelope(b"first"), exchange=name)
    with pytest.raises(PublishNacked) as nacked:
        await broker.publish(Envelope(b"second"), exchange=name)
    assert nacked.value.sends == 2
    text = str(nacked.value)
    assert "sent twice" in text and "other queues it was routed to" in text and "may hold it twice" in text, text
    # first, and second twice: nothing lost, one duplicate (the count follows the queue a moment later, under load)
    await until(lambda: _ready_is(broker, kept, 3), timeout=10)

    with pytest.raises(PublishNacked) as again:  # within the second after the replacement: sent once
        await broker.publish(Envelope(b"third"), exchange=name)
    assert again.value.sends == 1
    assert "sent twice" not in str(again.value) and "other queues it was routed to" in str(again.value).lower()
    await until(lambda: _ready_is(broker, kept, 4), timeout=10)


async def _ready_is(broker: Broker, queue: str, count: int) -> bool:
    return (await broker.queue_counts(queue))[0] == count
