"""Publisher side of issue 10: ConfirmingPublisher keeps a bounded record of failures."""

from __future__ import annotations

import pytest

from amqpkit import Broker, ConfirmingPublisher, Overflow, PublishNacked, Queue, TextCodec


@pytest.mark.parametrize("window", [1, 50])
async def test_failures_are_bounded_and_counted(broker: Broker, name: str, cleanup: list[str], window: int) -> None:
    cleanup.append(f"q:{name}")
    # A full queue that rejects new publishes makes the broker nack them.
    await broker.declare_queue(Queue(name, max_length=10, overflow=Overflow.REJECT_PUBLISH))
    seen = 0

    def count(_: object) -> None:
        nonlocal seen
        seen += 1

    async with ConfirmingPublisher(
        broker, "", TextCodec(), window=window, keep_failures=5, on_outcome=count
    ) as publisher:
        for i in range(210):
            await publisher.publish(str(i), routing_key=name, message_id=f"m{i}")
    assert seen == 210
    assert publisher.confirmed == 10
    assert publisher.failed == 200  # every failure is counted ...
    assert len(publisher.failures) == 5  # ... and only the latest few are kept
    assert all(isinstance(o.error, PublishNacked) for o in publisher.failures)
    assert [o.message_id for o in publisher.failures] == [f"m{i}" for i in range(205, 210)]


def test_keep_failures_must_not_be_negative(broker: Broker) -> None:
    with pytest.raises(ValueError, match="keep_failures"):
        ConfirmingPublisher(broker, keep_failures=-1)
