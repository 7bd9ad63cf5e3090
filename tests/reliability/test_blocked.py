"""A connection the broker blocks during a memory alarm, for longer than calls and leases last.

RabbitMQ blocks a connection once it publishes during an alarm, and then reads
nothing more from it until the alarm clears. Nothing is lost; what matters is
what callers see meanwhile and what runs afterwards. On a RabbitMQ node of the
test's own (an alarm is node-wide: never raised on the shared node).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from amqpkit import (
    Broker,
    BrokerSettings,
    Delivery,
    Envelope,
    Exchange,
    PublishTimeout,
    Queue,
    ReconnectPolicy,
    RetryPolicy,
    RpcClient,
    RpcServer,
    RpcTimeout,
    Subscriber,
    Worker,
    WorkQueue,
)
from amqpkit.patterns.tasks import attempt_of

from ..brokerctl import SpareNode
from ..waiting import wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpareNode]:
    spare = SpareNode(tmp_path_factory.mktemp("blocked"))
    spare.start()
    try:
        yield spare
    finally:
        spare.stop()


def settings(node: SpareNode, **overrides: Any) -> BrokerSettings:
    options: dict[str, Any] = {"heartbeat": 5, "connect_timeout": 5, "publish_timeout": 10, **overrides}
    return BrokerSettings(url=node.url, reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=1.0), **options)


@contextlib.asynccontextmanager
async def memory_alarm(node: SpareNode) -> AsyncIterator[None]:
    """The node in a memory alarm; cleared on the way out, whatever happened."""
    ctl = node.ctl
    try:
        assert (await asyncio.to_thread(ctl, "set_vm_memory_high_watermark", "0.0000001")).returncode == 0
        alarmed = False
        for _ in range(100):
            alarms = await asyncio.to_thread(ctl, "eval", "rabbit_alarm:get_alarms().")
            if "memory" in alarms.stdout:
                alarmed = True
                break
            await asyncio.sleep(0.1)
        assert alarmed, "the node raised no memory alarm"
        yield
    finally:
        await asyncio.to_thread(ctl, "set_vm_memory_high_watermark", "0.4")


async def block(broker: Broker) -> None:
    """Publish once, unconfirmed, so that the broker blocks ``broker``'s connection; wait until it says so."""
    await broker.publish(Envelope(b"blocks"), routing_key="amqpkit-nowhere", confirm=False)
    await wait_for(lambda: broker.blocked is not None, 10)


@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
async def test_a_first_call_on_a_blocked_connection_ends_at_its_timeout(
    node: SpareNode, name: str, reply_queue: str
) -> None:
    """A new client's start (a channel, or a reply queue) is not read by the broker: the call still ends."""
    async with Broker(settings(node)) as broker:
        async with memory_alarm(node):
            await block(broker)
            client = RpcClient(broker, f"{name}.rpc", reply_queue=reply_queue)  # type: ignore[arg-type]
            started = time.monotonic()
            with pytest.raises(RpcTimeout, match=r"still starting.*blocked this connection: low on memory"):
                await client.call("echo", 1, timeout=1)
            took = time.monotonic() - started
            assert took < 1.5, f"the call ended {took:.1f} s after it began, with a 1 s timeout"
            # The caller gives up on the client while its start still waits: once the broker reads again, that
            # start ends and must not leave a reply queue or channel behind (a review: it did, for good).
            await client.close()
        await wait_for(lambda: broker.blocked is None, 10)
        starting = client._starting
        assert starting is not None
        await asyncio.wait_for(asyncio.wait({starting}), 10)
        assert client._channel is None or client._channel.is_closed
        assert client._reply_consumer is None
        assert not [c for c in broker.consumers if c.queue.exclusive]


async def test_calls_made_while_blocked_are_not_run_after_their_callers_gave_up(node: SpareNode, name: str) -> None:
    """Requests written to a blocked connection would wait unread in its socket and run once the alarm clears,
    minutes after their callers were told RpcTimeout; they are not written."""
    runs: list[int] = []
    async with Broker(settings(node)) as server_broker, Broker(settings(node)) as client_broker:
        server = RpcServer(server_broker, f"{name}.rpc")

        @server.method("record")
        async def record(n: int) -> int:
            runs.append(n)
            return n

        await server.start()
        client = RpcClient(client_broker, f"{name}.rpc")
        assert await client.call("record", 0, timeout=5) == 0  # started before the alarm
        try:
            async with memory_alarm(node):
                await block(client_broker)
                for n in range(1, 6):
                    with pytest.raises(RpcTimeout, match="not sent: the broker has blocked this connection"):
                        await client.call("record", n, timeout=0.5)
            await wait_for(lambda: client_broker.blocked is None, 10)
            assert await client.call("record", 6, timeout=10) == 6  # it works again once unblocked
            await asyncio.sleep(2)  # what was written meanwhile would be read and run by now
            assert runs == [0, 6], f"runs after their callers got RpcTimeout: {runs}"
        finally:
            await client.close()
            await server.stop()


async def test_a_publish_the_blocked_broker_does_not_confirm_says_so(
    node: SpareNode, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqpkit")
    queue = Queue(f"{name}.q", auto_delete=False)
    async with Broker(settings(node)) as broker:
        await broker.declare_queue(queue)
        try:
            async with memory_alarm(node):
                await block(broker)
                assert broker.blocked == "low on memory"
                with pytest.raises(PublishTimeout, match="the broker has blocked this connection: low on memory"):
                    await broker.publish(Envelope(b"during"), routing_key=queue.name, timeout=1)
            await wait_for(lambda: broker.blocked is None, 10)
            await broker.publish(Envelope(b"after"), routing_key=queue.name, timeout=10)
        finally:
            await broker.delete_queue(queue.name)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "blocked this connection" in r.getMessage()
            or "unblocked this connection" in r.getMessage()]  # fmt: skip
    assert [level for level, _ in said] == [logging.WARNING, logging.INFO], said
    assert "low on memory" in said[0][1]
    assert not [r for r in caplog.records if r.name.startswith("aiormq") and "blocked" in r.getMessage()]


async def test_a_delay_queue_that_expired_while_the_broker_read_nothing_is_not_reported_lost(
    node: SpareNode, name: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its renewal waited out the block; the queue expired as declared meanwhile, holding nothing. That is
    not the "deleted, or a policy's shorter expiry; retries lost" of a queue gone before its time."""
    monkeypatch.setattr(WorkQueue, "delay_queue_min_expiry", 2.0)
    caplog.set_level(logging.INFO, logger="amqpkit")
    done: list[str] = []
    async with Broker(settings(node)) as broker:
        work = WorkQueue(broker, f"{name}.tasks", retry=RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=0))

        async def handler(task: Delivery[Any]) -> None:
            if attempt_of(task.headers) == 1:
                raise RuntimeError("fails once")
            done.append(task.message_id or "")

        worker = Worker(work, handler, concurrency=2)
        await worker.start()
        try:
            await work.enqueue({"n": 0})
            await wait_for(lambda: len(done) == 1, 15)  # the delay queue exists and its lease is renewed
            async with memory_alarm(node):
                await block(broker)
                await asyncio.sleep(6)  # three times the delay queue's expiry, its renewal waiting unread
            await wait_for(lambda: broker.blocked is None, 10)
            await work.enqueue({"n": 1})
            await wait_for(lambda: len(done) == 2, 20)
        finally:
            await worker.stop(grace=1)  # its queues go with the node, which is the test module's own
    assert work.delay_queues_vanished == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


async def test_a_stop_during_a_start_the_blocked_broker_holds_up_ends_at_once(node: SpareNode, name: str) -> None:
    """A SIGTERM during an alarm: the worker's start waits unread for its declares, and its stop waited for that
    start, the whole alarm (a review). The stop ends the start and returns within its grace; the start returns
    with the worker stopped, and once the broker reads again nothing of it is left attached."""
    async with Broker(settings(node)) as broker:
        work = WorkQueue(broker, f"{name}.tasks")
        worker = Worker(work, lambda task: None, concurrency=1)
        async with memory_alarm(node):
            await block(broker)
            starting = asyncio.ensure_future(worker.start())
            await asyncio.sleep(1)
            assert not starting.done(), "the start did not wait for the blocked broker: the test shows nothing"
            began = time.monotonic()
            await asyncio.wait_for(worker.stop(grace=1), 30)
            took = time.monotonic() - began
            assert took < 3, f"the stop took {took:.1f} s during the alarm, with a 1 s grace"
            await asyncio.wait_for(starting, 5)  # it returns: the worker is stopped, as asked
            assert worker._consumer is None and worker._keeper is None
        await wait_for(lambda: broker.blocked is None, 10)
        # The start's declares are answered once the alarm clears; what it started is taken down, not left running.
        await asyncio.sleep(2)
        assert not [c for c in broker.consumers if c.queue.name == work.queue.name]
        listed = await asyncio.to_thread(node.ctl, "list_queues", "name", "consumers", "-q")
        assert not [line for line in listed.stdout.splitlines() if line.split()[:1] == [work.queue.name]
                    and line.split()[1:] != ["0"]], listed.stdout  # fmt: skip
        # It starts again, and takes tasks.
        done: list[int] = []
        again = Worker(work, lambda task: done.append(1), concurrency=1)
        async with again:
            await work.enqueue({"n": 1})
            await wait_for(lambda: done == [1], 15)


@pytest.mark.parametrize("kind", ["subscriber", "rpc_server"])
async def test_a_stop_during_a_start_is_not_undone_by_that_start(node: SpareNode, name: str, kind: str) -> None:
    """A Subscriber's or an RpcServer's stop() during its start() returned at once, and the start, answered once
    the broker read again, attached a consumer after all: stopped, it took messages (or requests) for good."""
    runs: list[object] = []
    async with Broker(settings(node)) as broker:
        exchange = Exchange(f"{name}.x", type="fanout")
        pattern: Subscriber[Any] | RpcServer
        if kind == "subscriber":
            pattern = Subscriber(broker, exchange, runs.append, queue=f"{name}.sub")
        else:
            pattern = RpcServer(broker, f"{name}.rpc", handlers={"run": runs.append})
        async with memory_alarm(node):
            await block(broker)
            starting = asyncio.ensure_future(pattern.start())
            await asyncio.sleep(1)
            assert not starting.done(), "the start did not wait for the blocked broker: the test shows nothing"
            await asyncio.wait_for(pattern.stop(grace=1), 10)
            await asyncio.wait_for(starting, 5)  # it returns: stopped, as asked
        await wait_for(lambda: broker.blocked is None, 10)
        await asyncio.sleep(2)  # the start's declares are answered now
        listed = await asyncio.to_thread(node.ctl, "list_consumers", "queue_name", "-q")
        assert not [line for line in listed.stdout.splitlines() if line.startswith(name)], listed.stdout
        assert not [c for c in broker.consumers if c.queue.name.startswith(name)]
        if kind == "subscriber":
            with contextlib.suppress(Exception):  # no queue bound, or no exchange: nothing to deliver either way
                await broker.publish(Envelope(b"{}"), exchange=exchange.name, confirm=True)
        await asyncio.sleep(1)
        assert runs == []
