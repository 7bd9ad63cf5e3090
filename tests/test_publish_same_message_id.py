"""Publishes sharing a message id, in flight together on one Broker: each gets its own outcome.

aiormq ties a ``basic.return`` to a publish by the returned message's id
(the latest publish with that id). With two confirmed publishes of the same
id in flight on one channel, one routable and one not, the return was
charged to the routable one (a false ``Unroutable``) and the unroutable one
was then reported confirmed: a message lost with no error. Ids repeat in
practice: a retried task keeps its id, an outbox row keeps its id across
relays, and idempotent publishers set their own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from amqpkit import Broker, Envelope, Queue, Unroutable


@pytest.mark.parametrize("message_id", ["the-same-id", None])
async def test_an_unroutable_publish_fails_and_a_routed_one_succeeds(
    broker: Broker, name: str, cleanup: list[str], message_id: str | None
) -> None:
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    nowhere = f"{name}.nowhere"
    for _ in range(5):  # the order in which the two reach the channel is up to the event loop: try both ways
        results = await asyncio.gather(
            broker.publish(Envelope(b"nowhere", message_id=message_id), routing_key=nowhere, mandatory=True),
            broker.publish(Envelope(b"routed", message_id=message_id), routing_key=name, mandatory=True),
            return_exceptions=True,
        )
        assert isinstance(results[0], Unroutable), results[0]
        assert results[1] is None, results[1]
        results = await asyncio.gather(
            broker.publish(Envelope(b"routed", message_id=message_id), routing_key=name, mandatory=True),
            broker.publish(Envelope(b"nowhere", message_id=message_id), routing_key=nowhere, mandatory=True),
            return_exceptions=True,
        )
        assert results[0] is None, results[0]
        assert isinstance(results[1], Unroutable), results[1]
    assert (await broker.queue_counts(name))[0] == 10


async def test_many_publishes_of_one_id_all_settle(broker: Broker, name: str, cleanup: list[str]) -> None:
    """Waiting for an earlier publish of the same id neither deadlocks nor drops any of them."""
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    await asyncio.wait_for(
        asyncio.gather(*(broker.publish(Envelope(b"x", message_id="one"), routing_key=name) for _ in range(50))), 30
    )
    assert (await broker.queue_counts(name))[0] == 50


async def test_publishes_of_one_id_that_cannot_come_back_go_together(
    broker: Broker, name: str, cleanup: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a mandatory publish can be returned: publishes that are not wait for no one of their id but it."""
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    in_flight = most = 0
    publish_confirmed = broker._publish_confirmed

    async def counted(*args: Any, **kwargs: Any) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await publish_confirmed(*args, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(broker, "_publish_confirmed", counted)
    await asyncio.wait_for(
        asyncio.gather(*(broker.publish(Envelope(b"x", message_id="one"), routing_key=name) for _ in range(50))), 30
    )
    assert most > 1, "50 publishes of one id, none of them mandatory, went one at a time"
    assert (await broker.queue_counts(name))[0] == 50


async def test_a_mandatory_publish_is_told_apart_from_others_of_its_id(
    broker: Broker, name: str, cleanup: list[str]
) -> None:
    """Publishes that are not mandatory share an id with each other, never with a mandatory one in flight."""
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    for _ in range(5):
        routed = [broker.publish(Envelope(b"routed", message_id="id"), routing_key=name) for _ in range(4)]
        nowhere = broker.publish(Envelope(b"nowhere", message_id="id"), routing_key=f"{name}.nowhere", mandatory=True)
        results = await asyncio.gather(*routed[:2], nowhere, *routed[2:], return_exceptions=True)
        assert [type(r).__name__ for r in results] == ["NoneType", "NoneType", "Unroutable", "NoneType", "NoneType"]
    assert (await broker.queue_counts(name))[0] == 20
