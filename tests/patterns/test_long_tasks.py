"""Long and CPU-bound tasks against the real broker, on a 2-second heartbeat.

- a plain ``def`` handler that blocks for 8 s runs in a thread: the task
  completes exactly once and the connection is never lost;
- a CPU-bound handler on the process executor completes exactly once;
- an ``async def`` handler that blocks the event loop is named by the
  watchdog, and a connection lost to it says so;
- a task held past the broker's ``consumer_timeout`` is reported by name
  and then completes or goes to the DLQ, never loops (on a RabbitMQ node
  of the test's own: the timeout is a node-wide setting on 3.10);
- ``stop()`` never raises a connection error into user code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from amqpkit import (
    Broker,
    BrokerSettings,
    Envelope,
    Exchange,
    ExchangeType,
    ReconnectPolicy,
    RetryPolicy,
    RpcClient,
    RpcServer,
    Subscriber,
    Worker,
    WorkQueue,
)
from amqpkit.patterns.dlq import list_dead_letters

from .. import long_task_handlers as handlers
from ..brokerctl import SpareNode, consumer_timeout_node
from ..reliability.proxy import FaultProxy, proxied_url
from ..waiting import until, wait_for

HEARTBEAT = 2
FAST = RetryPolicy(max_attempts=3, initial_delay=0.2, multiplier=1, jitter=0)


def short_heartbeat(url: str, **kw: Any) -> BrokerSettings:
    return BrokerSettings(
        url=url,
        heartbeat=HEARTBEAT,
        connect_timeout=5,
        publish_timeout=15,
        reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=1.0, jitter=0.1),
        **kw,
    )


async def drop_work_queue(broker: Broker, queue: WorkQueue[Any]) -> None:
    for q in [queue.name, queue.dlq_name, *(f"{queue.name}.retry.{ms}" for ms in queue._delay_queues)]:
        with contextlib.suppress(Exception):
            await broker.delete_queue(q)


async def settled_and_empty(broker: Broker, queue: str) -> bool:
    ready, _ = await broker.queue_counts(queue)
    return ready == 0


# ---------------------------------------------------------------- a plain def that blocks


async def test_blocking_def_handler_completes_once_without_reconnect(amqp_url: str, name: str) -> None:
    """8 s of time.sleep in a plain def on a 2 s heartbeat: it runs in a thread, the loop keeps the link alive."""
    runs: list[int] = []
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def resize(job: dict[str, int]) -> str:
        threads.append(threading.get_ident())
        runs.append(job["n"])
        time.sleep(8)
        return "done"

    async with Broker(short_heartbeat(amqp_url)) as broker:
        queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.jobs", retry=FAST)
        try:
            await queue.enqueue({"n": 1})
            async with Worker(queue, resize, concurrency=2) as worker:
                await wait_for(lambda: worker.completed == 1, timeout=40)
            # Stopped: an ack that never reached the broker would have put the task back by now.
            assert await settled_and_empty(broker, queue.name)
            assert runs == [1]
            assert threads and threads[0] != loop_thread
            assert broker.reconnects == 0
            assert (worker.retried, worker.dead_lettered) == (0, 0)
        finally:
            await drop_work_queue(broker, queue)


# ---------------------------------------------------------------- CPU-bound, in a process


async def test_cpu_bound_handler_on_the_process_executor_completes_once(
    amqp_url: str, name: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "runs.log")
    async with Broker(short_heartbeat(amqp_url)) as broker:
        queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.cpu", retry=FAST)
        try:
            await queue.enqueue({"n": 1, "seconds": 6, "log": log})
            async with Worker(queue, handlers.crunch, concurrency=1, executor="process", processes=1) as worker:
                await wait_for(lambda: worker.completed == 1, timeout=60)
            assert await settled_and_empty(broker, queue.name)
            assert len(handlers.runs(log)) == 1
            assert len(handlers.runs(log, "done")) == 1
            assert all(f"pid={os.getpid()}" not in run for run in handlers.runs(log))  # in the pool, not here
            assert broker.reconnects == 0
            assert (worker.retried, worker.dead_lettered) == (0, 0)
        finally:
            await drop_work_queue(broker, queue)


# ---------------------------------------------------------------- an async def that blocks the loop


async def blocks_the_loop(job: dict[str, float]) -> None:
    time.sleep(job["seconds"])  # the mistake the watchdog is there to name


def watchdog_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "amqpkit.watchdog" and r.levelno >= logging.WARNING]


async def test_an_async_handler_that_blocks_is_named_once(
    amqp_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqpkit")
    async with Broker(short_heartbeat(amqp_url)) as broker:
        queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.blocks", retry=FAST)
        try:
            await queue.enqueue({"seconds": 1.2})
            async with Worker(queue, blocks_the_loop, concurrency=1) as worker:
                await wait_for(lambda: worker.completed == 1, timeout=30)
                await wait_for(lambda: watchdog_warnings(caplog), timeout=10)
            warnings = watchdog_warnings(caplog)
            assert len(warnings) == 1, warnings
            text = warnings[0]
            assert "blocks_the_loop" in text
            assert re.search(r"blocked for 1\.\d s", text), text
            assert "test_long_tasks.py" in text  # where it blocked
            assert "executor" not in text  # under the heartbeat: named, no advice yet
        finally:
            await drop_work_queue(broker, queue)


async def test_blocking_past_the_heartbeat_gives_advice_and_the_lost_connection_says_why(
    amqp_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqpkit")
    async with Broker(short_heartbeat(amqp_url)) as broker:
        queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.blocks", retry=FAST)
        try:
            await queue.enqueue({"seconds": 8})
            async with Worker(queue, blocks_the_loop, concurrency=1):
                await wait_for(lambda: broker.reconnects >= 1, timeout=40)
            warnings = watchdog_warnings(caplog)
            assert warnings, "no watchdog warning"
            first = warnings[0]
            assert "blocks_the_loop" in first
            assert "heartbeat" in first
            assert "def" in first and "executor='process'" in first
            lost = [r.getMessage() for r in caplog.records if r.name == "amqpkit.broker" and "lost" in r.getMessage()]
            assert lost, "no 'connection lost' line"
            assert "event loop was blocked" in lost[0], lost[0]
            assert "blocks_the_loop" in lost[0], lost[0]
        finally:
            await drop_work_queue(broker, queue)


# ---------------------------------------------------------------- consumer_timeout, on a node of our own

CONSUMER_TIMEOUT_MS = 5000


@pytest.fixture(scope="module")
def timeout_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpareNode]:
    """A node of the test's own with consumer_timeout lowered to 5 s and checked every second."""
    with consumer_timeout_node(tmp_path_factory.mktemp("consumer-timeout"), CONSUMER_TIMEOUT_MS) as node:
        yield node


@pytest.mark.timeout(240)
async def test_a_def_task_past_consumer_timeout_is_reported_and_completes_once(
    timeout_node: SpareNode, name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker takes the task back after 5 s; its run goes on in a thread, and the copy waits for it."""
    caplog.set_level(logging.INFO, logger="amqpkit")
    log = str(tmp_path / "runs.log")
    async with Broker(short_heartbeat(timeout_node.url)) as broker:
        queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.long", retry=FAST)
        try:
            task_id = await queue.enqueue({"n": 1, "seconds": 7, "log": log})
            async with Worker(queue, handlers.sleep_then_done, concurrency=1) as worker:
                await wait_for(lambda: worker.completed == 1, timeout=40)
            assert await settled_and_empty(broker, queue.name)
            assert len(handlers.runs(log)) == 1, handlers.runs(log)
            reports = [r.getMessage() for r in caplog.records if "consumer_timeout" in r.getMessage()]
            assert reports and task_id in reports[0], reports
            assert (await broker.queue_counts(queue.dlq_name))[0] == 0
        finally:
            await drop_work_queue(broker, queue)


@pytest.mark.timeout(240)
async def test_an_async_task_past_consumer_timeout_goes_to_the_dlq_and_does_not_loop(
    timeout_node: SpareNode, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An async run is cancelled when the broker closes its channel; the copy is dead-lettered, not run again."""
    caplog.set_level(logging.INFO, logger="amqpkit")
    started: list[float] = []

    async def long_job(job: dict[str, int]) -> None:
        started.append(time.monotonic())
        await asyncio.sleep(30)

    async with Broker(short_heartbeat(timeout_node.url)) as broker:
        queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.long", retry=FAST)
        try:
            task_id = await queue.enqueue({"n": 1})
            async with Worker(queue, long_job, concurrency=1) as worker:
                await until(lambda: _has_dead_letters(broker, queue.dlq_name), timeout=40)
                assert worker.dead_lettered == 1
            assert len(started) == 1
            dead = await list_dead_letters(broker, queue.name)
            assert [(d.task_id, d.reason) for d in dead] == [(task_id, "consumer-timeout")]
            assert "consumer_timeout" in dead[0].error
            reports = [r.getMessage() for r in caplog.records if "consumer_timeout" in r.getMessage()]
            assert reports and task_id in reports[0], reports
            assert await settled_and_empty(broker, queue.name)
        finally:
            await drop_work_queue(broker, queue)


async def _has_dead_letters(broker: Broker, dlq: str) -> bool:
    return (await broker.queue_counts(dlq))[0] >= 1


# ---------------------------------------------------------------- stop with the connection gone


def lost_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("amqpkit") and "in flight" in r.getMessage()]


async def test_stop_with_the_connection_gone_raises_nothing_and_counts_what_was_lost(
    proxy: FaultProxy, amqp_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqpkit")
    entered = asyncio.Event()
    release = threading.Event()

    async def held(job: dict[str, int]) -> None:
        entered.set()
        await asyncio.sleep(30)

    def held_in_thread(value: str) -> None:
        release.wait(30)

    async def held_rpc(value: str) -> str:
        await asyncio.sleep(30)
        return value

    async with Broker(short_heartbeat(proxied_url(proxy, amqp_url))) as broker:
        queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.held", retry=FAST)
        exchange = Exchange(f"{name}.x", type=ExchangeType.FANOUT, durable=False, auto_delete=True)
        server = RpcServer(broker, f"{name}.rpc", handlers={"echo": held_rpc})
        try:
            worker = Worker(queue, held, concurrency=1)
            subscriber: Subscriber[Any] = Subscriber(broker, exchange, held_in_thread, queue=f"{name}.sub")
            await worker.start()
            await subscriber.start()
            await server.start()
            await queue.enqueue({"n": 1})
            await broker.publish(Envelope(b'"hello"', content_type="application/json"), exchange=exchange.name)
            async with RpcClient(broker, f"{name}.rpc") as client:
                call = asyncio.ensure_future(client.call("echo", "x", timeout=20))
                await asyncio.wait_for(entered.wait(), 10)
                await wait_for(lambda: subscriber._consumer is not None and bool(subscriber._consumer.inflight))
                await wait_for(lambda: server._consumer is not None and bool(server._consumer.inflight))
                proxy.refusing = True
                proxy.cut()
                await wait_for(lambda: not broker.is_connected, timeout=10)
                # Stopping while the broker is out of reach: no connection error reaches us.
                await asyncio.wait_for(worker.stop(grace=1), 20)
                await asyncio.wait_for(subscriber.stop(grace=1), 20)
                await asyncio.wait_for(server.stop(grace=1), 20)
                call.cancel()
                with contextlib.suppress(BaseException):
                    await call
            lines = lost_lines(caplog)
            assert any(re.search(r"\b1 (task|message|request)s? in flight", line) for line in lines), lines
            proxy.refusing = False
        finally:
            release.set()
            proxy.refusing = False
            with contextlib.suppress(Exception):
                await broker.wait_connected(15)
                await drop_work_queue(broker, queue)
                await broker.delete_queue(f"{name}.sub")
                await broker.delete_queue(f"{name}.rpc")
