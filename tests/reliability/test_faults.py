"""Faults injected against the real broker: cuts, a broker restart, a stalled link, alarms, deleted queues."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from amqpkit import (
    Broker,
    BrokerSettings,
    ConnectionLost,
    Delivery,
    Envelope,
    Exchange,
    JsonCodec,
    PublishError,
    PublishTimeout,
    Queue,
    RetryPolicy,
    RpcClient,
    RpcServer,
    Subscriber,
    Worker,
    WorkQueue,
)

from ..brokerctl import arabbitmqctl, memory_alarm_raised, memory_watermark, rabbitmqctl, start_app, vhost_args
from ..waiting import until, wait_for
from .conftest import HEARTBEAT
from .proxy import FaultProxy


async def restart_broker_app() -> None:
    await arabbitmqctl("stop_app")
    try:
        await asyncio.sleep(1)  # the fault: the broker stays down a moment
    finally:
        await start_app()


@pytest.mark.whole_broker
@pytest.mark.timeout(300)
async def test_zero_loss_under_cuts_and_a_broker_restart(
    proxied: BrokerSettings, proxy: FaultProxy, name: str, report: dict[str, dict[str, object]]
) -> None:
    total = 5000
    queue_name = f"{name}.zero-loss"
    processed: Counter[str] = Counter()
    confirmed: set[str] = set()
    publish_retries = 0
    recoveries: list[float] = []

    async def handler(delivery: Delivery[Any]) -> None:
        processed[delivery.message_id or ""] += 1

    producer = Broker(proxied)
    consumer = Broker(proxied)
    await producer.connect()
    await consumer.connect()
    work: WorkQueue[Any] = WorkQueue(producer, queue_name, retry=RetryPolicy(max_attempts=3, initial_delay=0.05))
    worker_queue: WorkQueue[Any] = WorkQueue(consumer, queue_name)
    worker = Worker(worker_queue, handler, concurrency=32)
    await worker.start()

    async def produce(ids: list[str]) -> None:
        nonlocal publish_retries
        for task_id in ids:
            while True:
                try:
                    await work.enqueue({"id": task_id}, task_id=task_id, timeout=15)
                except (PublishError, ConnectionLost):
                    publish_retries += 1  # not confirmed: the producer sends it again
                    await asyncio.sleep(0.05)
                    continue
                confirmed.add(task_id)
                await asyncio.sleep(0.02)  # spread the 5,000 publishes over the faults (about 13 s)
                break

    async def recovered(since: float, generations: tuple[int, int]) -> None:
        """Both connections replaced (a new generation) and up: the time from the fault is the recovery time."""
        await wait_for(
            lambda: (
                (producer.generation, consumer.generation) > generations
                and producer.generation > generations[0]
                and consumer.generation > generations[1]
                and producer.is_connected
                and consumer.is_connected
            ),
            30,
        )
        recoveries.append(time.monotonic() - since)

    async def chaos() -> tuple[int, int]:
        """Seven cuts and one broker restart; returns (faults, faults that fell while publishing)."""
        faults = during = 0
        for step in range(8):
            await asyncio.sleep(0.6)  # the faults are spread over the publishing, not bunched at its start
            started = time.monotonic()
            generations = (producer.generation, consumer.generation)
            if len(confirmed) < total:
                during += 1
            if step == 2:
                await restart_broker_app()
            else:
                proxy.cut()
            faults += 1
            await recovered(started, generations)
        return faults, during

    ids = [f"{name}-{i}" for i in range(total)]
    try:
        producing = asyncio.gather(*(produce(ids[i::8]) for i in range(8)))
        faults, faults_during = await chaos()
        await producing
        await wait_for(lambda: confirmed <= set(processed), 60)
    finally:
        await worker.stop(grace=2)
        with contextlib.suppress(Exception):
            await producer.delete_queue(queue_name)
            await producer.delete_queue(f"{queue_name}.dlq")
        await producer.close()
        await consumer.close()
    lost = confirmed - set(processed)
    duplicates = sum(count - 1 for count in processed.values() if count > 1)
    report["zero_loss"] = {
        "fault": f"{faults - 1} proxy cuts + 1 broker app restart (stop_app/start_app)",
        "sent": total,
        "confirmed": len(confirmed),
        "faults_while_publishing": faults_during,
        "publish_retries": publish_retries,
        "republished_after_cut": producer.republished,
        "processed_unique": len(set(processed)),
        "lost": len(lost),
        "duplicates": duplicates,
        "recovery_s_max": round(max(recoveries), 2),
        "recovery_s_median": round(sorted(recoveries)[len(recoveries) // 2], 2),
    }
    print(report["zero_loss"])
    assert len(confirmed) == total
    assert faults_during >= 6, "the faults must fall while messages are being published"
    assert not lost, sorted(lost)[:10]
    assert faults >= 6
    assert proxy.cuts >= 5


async def test_consumers_come_back_after_twenty_cuts(
    proxied: BrokerSettings,
    proxy: FaultProxy,
    broker: Broker,
    amqp_url: str,
    name: str,
    report: dict[str, dict[str, object]],
) -> None:
    """A subscriber, a worker and an RPC server behind the proxy: after each cut, all three are back on the broker."""
    sub_queue, work_name, rpc_queue = f"{name}.sub", f"{name}.work", f"{name}.rpc"
    deadline = HEARTBEAT + 5
    times: list[float] = []
    async with Broker(proxied) as proxied_broker:

        async def nothing(_: Any) -> None:
            return None

        sub = Subscriber(proxied_broker, Exchange(f"{name}.x", type="fanout"), nothing, queue=sub_queue)
        work: WorkQueue[Any] = WorkQueue(proxied_broker, work_name)
        worker = Worker(work, nothing)
        server = RpcServer(proxied_broker, Queue(rpc_queue))
        server.add("echo", nothing)
        await sub.start()
        await worker.start()
        await server.start()
        queues = [sub_queue, work_name, rpc_queue]

        async def all_attached() -> bool:
            counts = [await broker.queue_counts(q) for q in queues]
            return all(c[1] == 1 for c in counts)

        try:
            for _ in range(20):
                generation = proxied_broker.generation
                assert proxy.cut() >= 1
                started = time.monotonic()
                # Until the client has reconnected, the broker may still count the old consumers.
                while proxied_broker.generation == generation or not await all_attached():
                    assert time.monotonic() - started < deadline, "consumers not back in time"
                    await asyncio.sleep(0.02)
                times.append(time.monotonic() - started)
                listed = await arabbitmqctl("list_consumers", *vhost_args(amqp_url), "-q", "queue_name")
                for q in queues:
                    assert listed.split().count(q) == 1, listed
            # And they work: an RPC round trip through the proxied server.
            async with RpcClient(broker, rpc_queue, timeout=5) as client:
                assert await client.call("echo", {"x": 1}) is None
        finally:
            await sub.stop()
            await worker.stop()
            await server.stop()
            for q in [*queues, f"{work_name}.dlq"]:
                with contextlib.suppress(Exception):
                    await broker.delete_queue(q)
            with contextlib.suppress(Exception):
                await broker.delete_exchange(f"{name}.x")
    report["consumers_return"] = {
        "fault": "20 proxy cuts in a row",
        "consumers": 3,
        "back_s_max": round(max(times), 2),
        "back_s_median": round(sorted(times)[10], 2),
        "limit_s": deadline,
    }
    print(report["consumers_return"])


async def test_stalled_link_is_noticed_by_the_heartbeat(
    proxied: BrokerSettings, proxy: FaultProxy, name: str, report: dict[str, dict[str, object]]
) -> None:
    lost_at: list[float] = []
    async with Broker(proxied) as b:
        b.on_disconnect(lambda exc: lost_at.append(time.monotonic()))
        queue = Queue(f"{name}.stall", auto_delete=False)
        await b.declare_queue(queue)
        try:
            await asyncio.sleep(HEARTBEAT)  # heartbeats flowing
            proxy.stall()
            stalled = time.monotonic()
            await wait_for(lambda: lost_at, 4 * HEARTBEAT)
            noticed = lost_at[0] - stalled
            reconnected = await wait_for(lambda: b.is_connected, 15)
            await b.publish(Envelope(b"after"), routing_key=queue.name)
            got = await b.get(queue.name)
            assert got is not None
            assert got.body == b"after"
            await got.ack()
        finally:
            proxy.resume()
            await b.delete_queue(queue.name)
    report["stalled_link"] = {
        "fault": "proxy stops forwarding (connection left open)",
        "heartbeat_s": HEARTBEAT,
        "noticed_s": round(noticed, 2),
        "reconnected_s_after": round(reconnected, 2),
    }
    print(report["stalled_link"])
    assert noticed <= 2 * HEARTBEAT + 0.5


@pytest.fixture
def watermark() -> Iterator[list[str]]:
    """The node's memory watermark before the test (rabbitmqctl arguments), set back after it whatever happened."""
    previous = memory_watermark()
    try:
        yield previous
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", *previous)


@pytest.mark.whole_broker
async def test_memory_alarm_publishes_time_out_then_succeed(
    settings: BrokerSettings, watermark: list[str], name: str, report: dict[str, dict[str, object]]
) -> None:
    queue = f"{name}.alarm"
    confirmed: list[str] = []
    timeout = 2.0
    async with Broker(settings) as b:
        await b.declare_queue(Queue(queue))
        for i in range(10):
            await b.publish(Envelope(b"before", message_id=f"before-{i}"), routing_key=queue)
            confirmed.append(f"before-{i}")
        timeouts = 0
        took: list[float] = []
        try:
            await arabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
            # The alarm is raised on the node's next memory check.
            await until(lambda: asyncio.to_thread(memory_alarm_raised), 30)
            for i in range(3):
                started = time.monotonic()
                with pytest.raises(PublishTimeout):
                    await b.publish(Envelope(b"during", message_id=f"during-{i}"), routing_key=queue, timeout=timeout)
                took.append(time.monotonic() - started)
                timeouts += 1
        finally:
            await arabbitmqctl("set_vm_memory_high_watermark", *watermark)  # the fixture does it again at the end
        cleared = time.monotonic()
        while True:
            try:
                await b.publish(Envelope(b"after", message_id="after"), routing_key=queue, timeout=2)
                break
            except PublishTimeout:
                assert time.monotonic() - cleared < 30, "publishing did not resume after the alarm cleared"
        confirmed.append("after")
        recovered = time.monotonic() - cleared
        got: list[str] = []
        while (d := await b.get(queue, auto_ack=True)) is not None:
            got.append(d.message_id or "")
        await b.delete_queue(queue)
    report["memory_alarm"] = {
        "fault": "memory alarm (vm_memory_high_watermark 1e-7)",
        "publishes_timed_out": timeouts,
        "timeout_s": timeout,
        "ended_after_s_max": round(max(took), 2),
        "resumed_s_after_clear": round(recovered, 2),
        "confirmed_lost": len(set(confirmed) - set(got)),
    }
    print(report["memory_alarm"])
    # Each publish ended at its deadline (not before it; after it only by the time to notice).
    assert all(timeout <= t < timeout + 5 for t in took), took
    assert set(confirmed) <= set(got)


async def test_queue_deleted_under_a_consumer_is_reattached(
    settings: BrokerSettings, broker: Broker, name: str, report: dict[str, dict[str, object]]
) -> None:
    queue = f"{name}.deleted"
    got: list[int] = []

    async def handler(n: int) -> None:
        got.append(n)

    async with Broker(settings) as b:
        ex = Exchange(f"{name}.x", type="fanout")
        async with Subscriber(b, ex, handler, queue=queue):
            await broker.delete_queue(queue)  # from another connection: the broker cancels the consumer
            started = time.monotonic()
            while True:
                with contextlib.suppress(Exception):
                    if (await broker.queue_counts(queue))[1] == 1:
                        break
                assert time.monotonic() - started < 10, "consumer not re-attached"
                await asyncio.sleep(0.02)
            back = time.monotonic() - started
            from amqpkit import Publisher

            await Publisher(b, ex, JsonCodec()).publish(1, mandatory=True)
            await wait_for(lambda: got == [1], 5)
        await b.delete_queue(queue)
        await b.delete_exchange(ex)
    report["queue_deleted"] = {"fault": "queue deleted under its consumer", "reattached_s": round(back, 2)}
    print(report["queue_deleted"])


async def test_consumer_that_cannot_come_back_reports_the_error(
    settings: BrokerSettings, broker: Broker, name: str
) -> None:
    """A queue someone else owns is deleted under our consumer: the error reaches our code, at once."""
    queue = f"{name}.theirs"
    await broker.declare_queue(Queue(queue))
    errors: list[BaseException] = []

    async def handler(_: Delivery[bytes]) -> None:
        return None

    async with Broker(settings) as b:
        consumer = await b.consume(Queue(queue), handler, declare=False, on_error=errors.append)
        assert consumer.attached.is_set()
        await broker.delete_queue(queue)
        await wait_for(lambda: errors, 5)
        assert "NOT_FOUND" in str(errors[0])
        assert consumer.cancelled
