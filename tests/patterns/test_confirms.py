"""ConfirmingPublisher: the three strategies, with nacks and returns reported per message."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from amqpkit import Broker, ConfirmingPublisher, Outcome, Overflow, PublishNacked, Queue, TextCodec, Unroutable


@pytest.mark.parametrize(("window", "batch"), [(1, False), (50, True), (200, False)])
async def test_every_message_confirmed(broker: Broker, name: str, cleanup: list[str], window: int, batch: bool) -> None:
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    seen: list[Outcome] = []
    publisher = ConfirmingPublisher(broker, "", TextCodec(), window=window, batch=batch, on_outcome=seen.append)
    async with publisher:
        futures = [await publisher.publish(str(i), routing_key=name, message_id=f"m{i}") for i in range(1000)]
        assert publisher.outstanding <= window
    assert publisher.outstanding == 0
    assert all(f.done() and f.result().confirmed for f in futures)
    assert publisher.confirmed == 1000
    assert sorted(o.message_id for o in seen) == sorted(f"m{i}" for i in range(1000))
    assert (await broker.queue_counts(name))[0] == 1000
    # Order on the queue is publish order.
    first = [await broker.get(name, auto_ack=True) for _ in range(5)]
    assert [d.body for d in first if d] == [b"0", b"1", b"2", b"3", b"4"]


@pytest.mark.parametrize("window", [1, 100])
async def test_nacks_are_reported_per_message(broker: Broker, name: str, cleanup: list[str], window: int) -> None:
    cleanup.append(f"q:{name}")
    # A full queue that rejects new publishes makes the broker nack them.
    await broker.declare_queue(Queue(name, max_length=10, overflow=Overflow.REJECT_PUBLISH))
    async with ConfirmingPublisher(broker, "", TextCodec(), window=window) as publisher:
        for i in range(30):
            await publisher.publish(str(i), routing_key=name, message_id=f"m{i}")
    assert publisher.confirmed == 10
    assert len(publisher.failures) == 20
    assert all(isinstance(o.error, PublishNacked) for o in publisher.failures)
    assert {o.message_id for o in publisher.failures} == {f"m{i}" for i in range(10, 30)}


async def test_returns_are_reported_per_message(broker: Broker, name: str, cleanup: list[str]) -> None:
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    async with ConfirmingPublisher(broker, "", TextCodec(), window=20, mandatory=True) as publisher:
        for i in range(40):
            key = name if i % 2 else f"{name}.nowhere"
            await publisher.publish(str(i), routing_key=key, message_id=f"m{i}")
    assert publisher.confirmed == 20
    assert {o.message_id for o in publisher.failures} == {f"m{i}" for i in range(0, 40, 2)}
    assert all(isinstance(o.error, Unroutable) for o in publisher.failures)


def test_window_must_be_positive(broker: Broker) -> None:
    with pytest.raises(ValueError, match="window"):
        ConfirmingPublisher(broker, window=0)


@pytest.mark.parametrize("window", [1, 16])
async def test_kept_failures_do_not_keep_their_messages(broker: Broker, name: str, window: int) -> None:
    """``failures`` keeps the latest 1,000 outcomes by default, a count, not a size: each kept its error with its
    traceback, whose frames held the message (body and envelope), the returned message and the channel, and after
    a reconnect the connection of that time. 256 KiB messages came back unroutable: 520 KiB kept per failure (a
    hunt, 3.10.8; 200 failures held 106 MB). An outcome now keeps its error's type, text and fields only."""
    body = b"x" * (256 * 1024)
    async with ConfirmingPublisher(broker, "", window=window, mandatory=True) as publisher:
        for _ in range(5):  # what is made once (channel, caches) made before the count
            await publisher.publish(body, routing_key=f"{name}.nobody")
        await publisher.flush()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(40):
                await publisher.publish(body, routing_key=f"{name}.nobody")  # no such queue: returned
            await publisher.flush()
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert publisher.failed == len(publisher.failures) == 45
        assert all(isinstance(o.error, Unroutable) and "NO_ROUTE" in str(o.error) for o in publisher.failures)
        per_failure = kept / 40 / 1024  # the last message's frame may be held a while: 6.4 KiB of it each
        assert per_failure < 32, f"{per_failure:.1f} KiB kept per failure"  # before: 527 KiB
