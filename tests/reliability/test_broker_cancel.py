"""Callbacks running when the broker cancels their consumer (someone deletes its queue) run to their end.

The broker's basic.cancel only ends the consumer: its channel stays open, and a settlement of a delivery it
carried is still accepted there (checked below on 3.10 and 4.0). Closing that channel at once, as the Broker
did, cancelled every running callback mid-run, after whatever side effect it had made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from amqpkit import Broker, BrokerSettings, Delivery, Envelope, Queue, QueueType, RetryPolicy, Worker, WorkQueue

from ..deliveries import acked_bodies
from ..waiting import wait_for

LOST = "in flight were lost"  # the line a stop says when callbacks were cut short (the broker delivers them again)


async def test_a_worker_handler_running_when_its_queue_is_deleted_runs_to_its_end(
    broker: Broker, settings: BrokerSettings, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Three tasks run (1.5 s each) when another client deletes the work queue. Each handler ends and its task
    is counted completed; the worker goes on at once on a new channel: a task sent while the three still run is
    taken before they end. Before: 3 of 3 handlers cancelled mid-run, the stop said they would be delivered
    again (they went with the queue)."""
    caplog.set_level(logging.INFO)
    work: WorkQueue[int] = WorkQueue(broker, f"{name}.jobs", retry=RetryPolicy(max_attempts=1))
    started: list[int] = []
    finished: list[int] = []

    async def handler(n: int) -> None:
        started.append(n)
        await asyncio.sleep(1.5 if n < 3 else 0)
        finished.append(n)

    try:
        async with Broker(settings) as other:
            worker = Worker(work, handler, concurrency=4)
            async with worker:
                for n in range(3):
                    await work.enqueue(n)
                await wait_for(lambda: len(started) == 3, 10)
                began = time.monotonic()
                await other.delete_queue(work.name)
                await wait_for(lambda: "broker cancelled consumer" in caplog.text, 5)
                # attached again on a new channel (its queue declared again) while the three still run
                await wait_for(lambda: worker._consumer is not None and worker._consumer.attached.is_set(), 5)
                await work.enqueue(3)
                await wait_for(lambda: 3 in finished, 5)
                assert not all(n in finished for n in range(3)), "the new task waited for the old ones"
                await wait_for(lambda: len(finished) == 4, 10)
                took = time.monotonic() - began
            print(f"worker: {len(finished)} of 4 handlers finished, the last {took:.2f} s after the delete")
            assert sorted(finished) == [0, 1, 2, 3]
            assert worker.completed == 4
            assert took < 3, took
        assert LOST not in caplog.text
    finally:
        for q in (work.name, work.dlq_name):
            with contextlib.suppress(Exception):
                await broker.delete_queue(q)


async def test_a_settlement_on_the_old_channel_after_the_queue_is_deleted_is_accepted(
    broker: Broker, settings: BrokerSettings, name: str
) -> None:
    """The callback acks its delivery after the broker cancelled the consumer (its queue deleted): the broker
    takes the ack on the old channel, which stays open until the callback ends, and closes nothing."""
    queue = Queue(f"{name}.q")
    acked = asyncio.Event()
    states: list[tuple[bool, BaseException | None]] = []

    async def callback(delivery: Delivery[bytes]) -> None:
        await asyncio.sleep(1.0)
        await delivery.ack()
        acked.set()
        await asyncio.sleep(0.5)  # a 406 for an unknown delivery tag would close the channel meanwhile
        channel = delivery._settler.channel
        assert channel is not None
        states.append((channel.is_closed, getattr(channel, "_close_exception", None)))

    try:
        async with Broker(settings) as b:
            consumer = await b.consume(queue, callback)
            await broker.publish(Envelope(b"x"), routing_key=queue.name)
            await wait_for(lambda: consumer.inflight, 5)
            await broker.delete_queue(queue.name)
            await asyncio.wait_for(acked.wait(), 5)
            await wait_for(lambda: states, 5)
            assert states == [(False, None)], states
            assert consumer.lost_in_flight == 0
            await consumer.cancel(grace=1)
    finally:
        await broker.delete_queue(queue.name)


async def test_callbacks_past_the_grace_are_cut_short_and_the_log_says_their_messages_went_with_the_queue(
    broker: Broker, settings: BrokerSettings, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback that would run 30 s gets the consumer's grace (0.5 s here) after the broker's cancel; then it
    is cancelled, and the log says its message went with the deleted queue, not that the broker delivers it
    again; it is not counted in ``lost_in_flight``, and the stop says nothing of lost messages."""
    caplog.set_level(logging.INFO)
    queue = Queue(f"{name}.q")
    cut: list[float] = []
    loop = asyncio.get_running_loop()
    deleted_at = 0.0

    async def callback(delivery: Delivery[bytes]) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cut.append(loop.time() - deleted_at)
            raise

    try:
        async with Broker(settings) as b:
            consumer = await b.consume(queue, callback, grace=0.5)
            for _ in range(2):
                await broker.publish(Envelope(b"x"), routing_key=queue.name)
            await wait_for(lambda: len(consumer.inflight) == 2, 5)
            deleted_at = loop.time()
            await broker.delete_queue(queue.name)
            await wait_for(lambda: len(cut) == 2, 5)
            print(f"cut short {cut[0]:.2f} and {cut[1]:.2f} s after the delete (grace 0.5 s)")
            assert all(0.5 <= t < 1.5 for t in cut), cut
            await wait_for(lambda: "cut short" in caplog.text, 5)
            assert consumer.lost_in_flight == 0
            await consumer.cancel()
        line = next(r.getMessage() for r in caplog.records if "cut short" in r.getMessage())
        assert "2 of 2" in line and "not delivered again" in line, line
        assert LOST not in caplog.text
    finally:
        await broker.delete_queue(queue.name)


async def test_a_hung_callback_of_a_consumer_that_cannot_come_back_is_cut_after_its_grace(
    broker: Broker, settings: BrokerSettings, name: str
) -> None:
    """A consumer of a queue it did not declare (``declare=False``) whose queue someone deletes cannot come back:
    the Broker stops it. Its retiring channel then waited, with no end, for a stop to cut the callbacks still
    running (a review: the Broker's own stop cancels none), so a hung callback held the old channel for as long as
    the Broker lived. Now it is cut after a second grace, and the channel closed."""
    queue = Queue(f"{name}.foreign", durable=True)
    await broker.declare_queue(queue)
    outcome: list[str] = []
    started = asyncio.Event()

    async def hangs(delivery: Delivery[bytes]) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            outcome.append("cut")
            raise

    try:
        async with Broker(settings) as owner:
            consumer = await owner.consume(queue, hangs, declare=False, grace=0.3)
            await broker.publish(Envelope(b"x"), routing_key=queue.name)
            await asyncio.wait_for(started.wait(), 10)
            channel = consumer._channel
            assert channel is not None
            await broker.delete_queue(queue.name)
            await wait_for(lambda: consumer.cancelled, 10)  # its queue cannot be declared again: stopped
            await wait_for(lambda: outcome == ["cut"] and channel.is_closed, 10)  # before: never
    finally:
        with contextlib.suppress(Exception):
            await broker.delete_queue(queue.name)


async def test_quorum_queues_someone_else_deletes_under_their_consumers_stop_them_and_nothing_else(
    broker: Broker, settings: BrokerSettings, name: str
) -> None:
    """Ten quorum queues another client declared, read with ``declare=False``, deleted by that client. Each
    consumer stops, its ``on_error`` told NOT_FOUND; the connection, and a consumer of a queue still there, carry
    on. Before, on RabbitMQ 4.0.5: the re-attach's basic.consume raced the deletion, the broker's channel crashed
    on it and the broker closed the whole connection (541 INTERNAL_ERROR), 3 runs of 3 (3.10.8: no close)."""
    queues = [Queue(f"{name}.theirs.{i}", type=QueueType.QUORUM) for i in range(10)]
    kept = Queue(f"{name}.kept", type=QueueType.QUORUM)
    errors: list[BaseException] = []
    got, take = acked_bodies()

    for queue in [*queues, kept]:
        await broker.declare_queue(queue)
    try:
        async with Broker(settings) as reader:
            for queue in queues:
                await reader.consume(queue, take, declare=False, on_error=errors.append)
            survivor = await reader.consume(kept, take, declare=False)
            for queue in queues:
                await broker.delete_queue(queue.name)
            await wait_for(lambda: len(errors) == len(queues), 15)
            assert all("NOT_FOUND" in str(e) for e in errors), errors
            await broker.publish(Envelope(b"still here"), routing_key=kept.name)
            await wait_for(lambda: got == [b"still here"], 10)
            assert reader.reconnects == 0
            assert reader.consumers == (survivor,)
    finally:
        await broker.delete_queue(kept.name)


async def test_quorum_queues_of_ours_someone_else_deletes_are_declared_again_and_read(
    broker: Broker, settings: BrokerSettings, name: str
) -> None:
    """Ten quorum queues the reader declared, deleted by another client: each is declared again and its consumer
    attached again, and a message sent to each afterwards arrives. Before, on RabbitMQ 4.0.5: the declare after
    the cancel found the queue still there (its deletion half done), the consume that followed got 404, and each
    consumer stopped for good, 10 of 10 in 3 runs of 3 (3.10.8: each attached again)."""
    queues = [Queue(f"{name}.ours.{i}", type=QueueType.QUORUM) for i in range(10)]
    errors: list[BaseException] = []
    got, take = acked_bodies()

    async with Broker(settings) as reader:
        try:
            for queue in queues:
                await reader.consume(queue, take, on_error=errors.append)
            channels = {c: c._channel for c in reader.consumers}
            for queue in queues:
                await broker.delete_queue(queue.name)

            def attached_again() -> bool:
                return all(c.attached.is_set() and c._channel is not channels[c] for c in reader.consumers)

            await wait_for(lambda: errors or (len(reader.consumers) == len(queues) and attached_again()), 30)
            assert not errors, errors
            for queue in queues:
                await broker.publish(Envelope(queue.name.encode()), routing_key=queue.name)
            await wait_for(lambda: len(got) == len(queues), 15)
            assert sorted(got) == sorted(q.name.encode() for q in queues)
            assert reader.reconnects == 0
        finally:
            for queue in queues:
                await reader.delete_queue(queue.name)
