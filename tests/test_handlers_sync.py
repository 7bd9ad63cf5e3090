"""Where handlers run: plain def in threads (Worker, Subscriber, RpcServer), executor='process', TaskContext.

Against the real broker. The 2-second-heartbeat proofs are in tests/patterns/test_long_tasks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from amqpkit import (
    Broker,
    BrokerSettings,
    Delivery,
    Envelope,
    Exchange,
    ExchangeType,
    HandlerCrashed,
    Queue,
    Reject,
    Retry,
    RetryPolicy,
    RpcClient,
    RpcServer,
    Subscriber,
    TaskContext,
    TaskStatus,
    Worker,
    WorkQueue,
)
from amqpkit.patterns.dlq import list_dead_letters
from amqpkit.patterns.work_queue import TASK_EVENTS_EXCHANGE
from amqpkit.watchdog import watch

from . import long_task_handlers as handlers
from .reliability.proxy import FaultProxy, proxied_url
from .waiting import until, wait_for

FAST = RetryPolicy(max_attempts=3, initial_delay=0.05, multiplier=1, jitter=0)


@pytest.fixture
async def work(broker: Broker, name: str) -> AsyncIterator[WorkQueue[Any]]:
    queue: WorkQueue[Any] = WorkQueue(broker, f"{name}.jobs", retry=FAST)
    yield queue
    for q in [queue.name, queue.dlq_name, *(f"{queue.name}.retry.{ms}" for ms in queue._delay_queues)]:
        with contextlib.suppress(Exception):
            await broker.delete_queue(q)


class Gauge:
    """How many calls run at once, and on which threads."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.threads.add(threading.get_ident())

    def leave(self) -> None:
        with self._lock:
            self.now -= 1


# ---------------------------------------------------------------- plain def, in threads


async def test_worker_runs_a_def_in_at_most_concurrency_threads(work: WorkQueue[Any]) -> None:
    gauge = Gauge()
    gate = threading.Event()
    loop_thread = threading.get_ident()

    def handle(job: dict[str, int]) -> None:
        gauge.enter()
        try:
            gate.wait(20)
        finally:
            gauge.leave()

    for n in range(6):
        await work.enqueue({"n": n})
    async with Worker(work, handle, concurrency=3) as worker:
        await wait_for(lambda: gauge.now == 3)
        # The loop is free while three handlers block: a broker round trip answers.
        assert (await work.broker.queue_counts(work.name))[0] == 3
        gate.set()
        await wait_for(lambda: worker.completed == 6)
    assert gauge.most == 3
    assert len(gauge.threads) <= 3 and loop_thread not in gauge.threads
    assert worker._handler.runs_on == "thread"


async def test_a_def_handler_fails_retries_and_rejects_like_an_async_one(broker: Broker, work: WorkQueue[Any]) -> None:
    seen: list[tuple[int, int]] = []

    def handle(delivery: Delivery[dict[str, Any]]) -> None:
        job = delivery.value
        attempt = int(delivery.headers.get("x-attempt", 1))
        seen.append((job["n"], attempt))
        if job["how"] == "retry" and attempt == 1:
            raise Retry("later", delay=0.05)
        if job["how"] == "error":
            raise RuntimeError("always")
        if job["how"] == "reject":
            raise Reject("no")

    ids = {how: await work.enqueue({"n": n, "how": how}) for n, how in enumerate(["retry", "error", "reject"])}
    async with Worker(work, handle, concurrency=4) as worker:
        await wait_for(lambda: worker.completed == 1 and worker.dead_lettered == 2)
    assert sorted(a for n, a in seen if n == 0) == [1, 2]
    assert sorted(a for n, a in seen if n == 1) == [1, 2, 3]
    dead = {d.task_id: d for d in await list_dead_letters(broker, work.name)}
    assert dead[ids["error"]].reason == "max-attempts" and dead[ids["error"]].error == "RuntimeError: always"
    assert dead[ids["reject"]].reason == "rejected"


async def test_subscriber_and_rpc_server_take_a_def(broker: Broker, name: str) -> None:
    loop_thread = threading.get_ident()
    got: list[tuple[str, int]] = []
    gauge = Gauge()

    def on_message(text: str) -> None:
        gauge.enter()
        try:
            time.sleep(0.2)  # blocking, in its thread
            got.append((text, threading.get_ident()))
        finally:
            gauge.leave()

    def double(x: int) -> int:
        assert threading.get_ident() != loop_thread
        return 2 * x

    exchange = Exchange(f"{name}.x", type=ExchangeType.FANOUT, durable=False, auto_delete=True)
    server = RpcServer(broker, f"{name}.rpc", concurrency=2)
    server.add("double", double)
    try:
        async with Subscriber(broker, exchange, on_message, prefetch=2), server:
            for i in range(4):
                await broker.publish(Envelope(f"m{i}".encode(), content_type="text/plain"), exchange=exchange.name)
            async with RpcClient(broker, f"{name}.rpc") as client:
                assert await asyncio.gather(*(client.call("double", i) for i in range(5))) == [0, 2, 4, 6, 8]
            await wait_for(lambda: len(got) == 4)
        assert sorted(t for t, _ in got) == ["m0", "m1", "m2", "m3"]
        assert loop_thread not in {ident for _, ident in got}
        assert gauge.most <= 2  # the subscriber's prefetch
    finally:
        with contextlib.suppress(Exception):
            await broker.delete_queue(f"{name}.rpc")


async def test_what_a_handler_signature_may_not_ask_for(broker: Broker, work: WorkQueue[Any]) -> None:
    def wants_context(text: str, ctx: TaskContext) -> None: ...

    async def on_loop(job: dict[str, Any]) -> None: ...

    def local(job: dict[str, Any]) -> None: ...

    def takes_delivery(d: Delivery[bytes]) -> None: ...

    exchange = Exchange(f"{work.name}.x", type=ExchangeType.FANOUT)
    with pytest.raises(TypeError, match="only work-queue handlers"):
        Subscriber(broker, exchange, wants_context)
    with pytest.raises(TypeError, match="async"):
        Worker(work, on_loop, executor="thread")
    with pytest.raises(TypeError, match="module-level"):
        Worker(work, local, executor="process")
    with pytest.raises(TypeError, match="not the Delivery"):
        Worker(work, takes_delivery, executor="process")
    with pytest.raises(ValueError, match="executor"):
        Worker(work, local, executor="fork")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="processes"):
        Worker(work, local, processes=2)


# ---------------------------------------------------------------- executor="process"


async def test_process_handler_returns_and_fails_like_the_loop(
    broker: Broker, work: WorkQueue[Any], tmp_path: Path
) -> None:
    log = str(tmp_path / "runs.log")
    ids = {
        how: await work.enqueue({"n": n, "how": how, "log": log})
        for n, how in enumerate(["error", "reject", "retry-once"])
    }
    async with Worker(work, handlers.fails, concurrency=2, executor="process", processes=2) as worker:
        await wait_for(lambda: worker.completed == 1 and worker.dead_lettered == 2, timeout=60)
    assert worker.retried == 3  # error twice, retry-once once
    dead = {d.task_id: d for d in await list_dead_letters(broker, work.name)}
    assert dead[ids["error"]].reason == "max-attempts"
    assert dead[ids["error"]].error == "ValueError: bad input 0"
    assert dead[ids["reject"]].reason == "rejected"
    assert dead[ids["reject"]].error == "Reject: not for us"
    # The traceback kept in the DLQ is the child's: it names the line that raised.
    raw = await broker.get(work.dlq_name)
    assert raw is not None
    assert "long_task_handlers.py" in str(raw.headers.get("x-error-traceback"))
    await raw.nack(requeue=True)
    assert len(handlers.runs(log, "done")) == 1


@pytest.mark.parametrize("how", ["exit", "sigkill"])
async def test_a_process_that_dies_fails_only_its_task(work: WorkQueue[Any], tmp_path: Path, how: str) -> None:
    dies, survives = str(tmp_path / "dies.log"), str(tmp_path / "survives.log")
    await work.enqueue({"n": 1, "seconds": 4, "log": survives})
    await work.enqueue({"n": 2, "how": how, "log": dies})
    async with Worker(work, handlers.die_once, concurrency=2, executor="process", processes=2) as worker:
        await wait_for(lambda: worker.completed == 2, timeout=60)
        runner = worker._handler.runner
    assert len(handlers.runs(survives)) == 1  # the other process went on undisturbed
    assert len(handlers.runs(dies)) == 2  # died once, then completed on its retry
    assert worker.retried == 1 and worker.dead_lettered == 0
    assert getattr(runner, "crashes", 0) == 1


async def test_stop_out_of_grace_stops_the_process_and_gives_the_task_back(
    broker: Broker, work: WorkQueue[Any], tmp_path: Path
) -> None:
    log = str(tmp_path / "runs.log")
    await work.enqueue({"n": 1, "seconds": 60, "log": log})
    worker = Worker(work, handlers.sleep_then_done, concurrency=1, executor="process", processes=1)
    await worker.start()
    try:
        await wait_for(lambda: bool(handlers.runs(log)), timeout=30)
    finally:
        await asyncio.wait_for(worker.stop(grace=0.5), 30)
    pid = int(handlers.runs(log)[0].rsplit("pid=", 1)[1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped (and collected), not left running its 60 s
    assert await until(lambda: _ready(broker, work.name, 1))
    assert not handlers.runs(log, "done")


async def _ready(broker: Broker, queue: str, count: int) -> bool:
    return (await broker.queue_counts(queue))[0] == count


async def test_a_crash_is_a_handler_crashed_error_with_the_exit_status(work: WorkQueue[Any], tmp_path: Path) -> None:
    from amqpkit._handlers import inspect_handler

    info = inspect_handler(handlers.die_once, executor="process", processes=1)
    try:
        job = {"how": "exit", "log": str(tmp_path / "x.log")}
        delivery: Delivery[Any] = Delivery(job, b"", _properties())
        with pytest.raises(HandlerCrashed) as caught:
            await info(delivery)
        assert caught.value.exitcode == 3
        assert "die_once" in str(caught.value)
        assert await info(delivery) == "ok"  # a fresh process took its place
    finally:
        info.close()


def _properties() -> Any:
    from pamqp.commands import Basic

    return Basic.Properties(message_id="m1")


# ---------------------------------------------------------------- progress


async def test_progress_is_published_as_task_events(broker: Broker, name: str) -> None:
    work: WorkQueue[Any] = WorkQueue(broker, f"{name}.prog", retry=FAST, events=True)
    events: list[dict[str, Any]] = []

    async def on_event(event: dict[str, Any]) -> None:
        events.append(event)

    async def async_handler(job: dict[str, Any], ctx: TaskContext) -> None:
        for i in range(1, 5):
            await ctx.progress(i / 4, f"step {i}")
        assert ctx.fraction == 1.0 and ctx.attempt == 1

    def def_handler(job: dict[str, Any], ctx: TaskContext) -> None:
        for i in range(1, 101):
            ctx.progress_nowait(i / 100, f"item {i}")  # as often as it likes: coalesced

    watch_progress = Subscriber(broker, TASK_EVENTS_EXCHANGE, on_event, binding_keys=[f"{work.name}.progress"])
    try:
        async with watch_progress:
            for fn in (async_handler, def_handler):
                task = await work.enqueue({"n": 1})
                async with Worker(work, fn, concurrency=1) as worker:
                    await wait_for(lambda w=worker: w.completed == 1)  # type: ignore[misc]
                    await wait_for(lambda t=task: any(e["task_id"] == t and e["progress"] == 1.0 for e in events))  # type: ignore[misc]
            task = await work.enqueue({"n": 2})
            async with Worker(work, handlers.report_progress, executor="process", processes=1) as worker:
                await wait_for(lambda: worker.completed == 1, timeout=60)
                await wait_for(lambda t=task: any(e["task_id"] == t and e["progress"] == 1.0 for e in events))  # type: ignore[misc]
        assert all(e["status"] == TaskStatus.PROGRESS.value and e["queue"] == work.name for e in events)
        by_task: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            by_task.setdefault(e["task_id"], []).append(e)
        assert len(by_task) == 3
        async_events, def_events, process_events = by_task.values()
        assert [e["note"] for e in async_events] == ["step 1", "step 2", "step 3", "step 4"]
        assert def_events[-1]["note"] == "item 100" and len(def_events) <= 100
        assert process_events[-1]["note"] == f"done {task}"
        fractions = [e["progress"] for e in def_events]
        assert fractions == sorted(fractions)
    finally:
        for q in (work.name, work.dlq_name):
            with contextlib.suppress(Exception):
                await broker.delete_queue(q)


class _Unsendable:
    """A decoded task no process can be sent (it refuses pickling)."""

    def __reduce__(self) -> Any:
        raise TypeError("this task cannot go to another process")


class _UnsendableCodec:
    content_type = "application/octet-stream"

    def encode(self, value: Any) -> bytes:
        return b"task"

    def decode(self, body: bytes, content_type: str | None = None) -> Any:
        return _Unsendable()


async def test_a_process_call_that_never_reached_its_process_keeps_no_context(broker: Broker, name: str) -> None:
    """A task whose value cannot be sent to the pool (pickling refuses it) fails before it runs there: no
    end-of-call report comes from a process for it, and its TaskContext (holding the delivery, body and all) was
    kept by the runner until the worker stopped: 200 such tasks, 200 kept (a hunt)."""
    work: WorkQueue[Any] = WorkQueue(broker, f"{name}.jobs", codec=_UnsendableCodec(), retry=FAST)

    def kept() -> int:
        gc.collect()
        return sum(type(o) is TaskContext for o in gc.get_objects())

    before = kept()  # any an earlier test of this process left
    try:
        async with Worker(work, handlers.report_progress, executor="process", processes=1) as worker:
            for _ in range(4):
                await work.enqueue("anything")
            await wait_for(lambda: worker.dead_lettered == 4, timeout=60)
            # At most the last call's: the pool's feeder thread holds the last call it tried to send until the next.
            with contextlib.suppress(AssertionError):  # the end of the last call is read a moment later
                await wait_for(lambda: kept() - before <= 1, timeout=5)
            assert kept() - before <= 1, f"{kept() - before} task contexts kept after 12 failed calls"  # before: 12
    finally:
        for q in (work.name, work.dlq_name, *(f"{work.name}.retry.{ms}" for ms in work._delay_queues)):
            with contextlib.suppress(Exception):
                await broker.delete_queue(q)


async def test_progress_is_a_fraction() -> None:
    ctx = TaskContext("t", "q")
    with pytest.raises(ValueError, match="fraction"):
        ctx.progress_nowait(1.5)
    with pytest.raises(ValueError, match="fraction"):
        await ctx.progress(float("nan"))
    await ctx.progress(0.25, "no events: kept on the context only")
    assert (ctx.fraction, ctx.note) == (0.25, "no events: kept on the context only")


# ---------------------------------------------------------------- a run that outlives its delivery


async def test_a_def_run_cut_off_by_a_lost_connection_is_not_run_again(
    proxy: FaultProxy, amqp_url: str, name: str, settings: BrokerSettings
) -> None:
    """The connection drops mid-task: the thread runs on; the broker's redelivery takes its outcome."""
    proxied = settings.model_copy(update={"urls": (proxied_url(proxy, amqp_url),)})
    runs: list[int] = []
    running = threading.Event()

    def handle(job: dict[str, int]) -> str:
        runs.append(job["n"])
        running.set()
        time.sleep(3)
        return "done"

    async with Broker(proxied) as broker:
        work: WorkQueue[Any] = WorkQueue(broker, f"{name}.cut", retry=FAST)
        try:
            await work.enqueue({"n": 1})
            async with Worker(work, handle, concurrency=1) as worker:
                await asyncio.to_thread(running.wait, 10)
                proxy.cut()
                await wait_for(lambda: worker.completed == 1, timeout=30)
                assert worker._handler.adopted == 1
            assert runs == [1]
            assert broker.reconnects >= 1
            assert await until(lambda: _empty(broker, work.name))
        finally:
            for q in (work.name, work.dlq_name):
                with contextlib.suppress(Exception):
                    await broker.delete_queue(q)


async def _empty(broker: Broker, queue: str) -> bool:
    return (await broker.queue_counts(queue))[0] == 0


# ---------------------------------------------------------------- the watchdog alone


async def test_the_watchdog_names_blocking_code_that_is_no_handler(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="amqpkit.watchdog")
    stop = watch(threshold=0.2, heartbeat=0)
    try:
        await asyncio.sleep(0.3)
        time.sleep(0.8)  # blocks the loop, outside any handler
        await wait_for(lambda: bool(caplog.records), timeout=5)
    finally:
        stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "test_handlers_sync.py" in warnings[0]
    assert "heartbeat off" in warnings[0]


@pytest.mark.parametrize(("threshold", "warned"), [(0.2, 1), (0, 0)])
async def test_the_broker_setting_sets_the_watchdog_threshold(
    amqp_url: str, caplog: pytest.LogCaptureFixture, threshold: float, warned: int
) -> None:
    caplog.set_level(logging.INFO, logger="amqpkit.watchdog")
    async with Broker(BrokerSettings(url=amqp_url, loop_block_warning=threshold)):
        await asyncio.sleep(0.3)
        time.sleep(0.8)
        await asyncio.sleep(0.3)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == warned


async def test_a_def_run_that_ends_as_its_delivery_is_lost_is_kept_for_the_redelivery(
    broker: Broker, name: str, cleanup: list[str]
) -> None:
    """The thread's run ends in the loop turn its delivery's channel closes: the redelivery takes its outcome.

    The run's result reaches the loop (the thread hands it over) and, in the same turn and before the task
    awaiting it resumes, the channel's close cancels that task with a reason, as aiormq does. The run was
    done, so it was not kept, and the broker's redelivery ran the handler a second time.
    """
    from amqpkit._handlers import inspect_handler

    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    await broker.publish(Envelope(b"x", message_id=f"{name}-m"), routing_key=name)
    delivery = await broker.get(name)
    assert delivery is not None
    release, finishing = threading.Event(), threading.Event()
    runs: list[int] = []

    def handle(body: bytes) -> str:
        runs.append(len(body))
        release.wait(10)
        finishing.set()
        return "done"

    info = inspect_handler(handle, concurrency=1)
    try:
        loop = asyncio.get_running_loop()
        running = asyncio.ensure_future(info(delivery))
        await wait_for(lambda: runs == [1] or running.done(), 5)
        assert not running.done(), running.exception()

        def hold() -> None:  # the run ends meanwhile; its result is queued for the loop, then the close's cancel
            release.set()
            finishing.wait(5)
            time.sleep(0.1)
            loop.call_soon(running.cancel, "the channel closed")

        loop.call_soon(hold)
        with pytest.raises(asyncio.CancelledError):
            await running
        kept = info.orphan(f"{name}-m")
        assert kept is not None and kept.result() == "done"  # None before: the handler would run again
        assert runs == [1]
    finally:
        info.close()
        await delivery.nack(requeue=False)


async def test_one_block_gives_one_warning_even_when_writing_it_lets_the_thread_look(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CI once saw two warnings for one block: the second named logging's flush and had the first's length.

    The beat that ends a block writes its warning before it sets the next beat's due time; a thread that looked
    while the warning was written (a stream's write lets go of the GIL) saw the old due time, took it for a new
    block, and the next beat reported that too. A slow log handler here makes the window wide.
    """
    caplog.set_level(logging.INFO, logger="amqpkit.watchdog")
    slow = _SlowFirstWarning(seconds=0.1)
    logging.getLogger("amqpkit.watchdog").addHandler(slow)
    stop = watch(threshold=0.3, heartbeat=0)
    try:
        await asyncio.sleep(0.3)
        time.sleep(0.8)  # one block
        await wait_for(lambda: slow.slept, timeout=5)
        await asyncio.sleep(0.6)  # beats enough to report a second block, were there one
    finally:
        stop()
        logging.getLogger("amqpkit.watchdog").removeHandler(slow)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "test_handlers_sync.py" in warnings[0]


class _SlowFirstWarning(logging.Handler):
    def __init__(self, seconds: float) -> None:
        super().__init__(logging.WARNING)
        self.seconds = seconds
        self.slept = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.slept:
            time.sleep(self.seconds)  # lets go of the GIL, like a write to a pipe
            self.slept = True
