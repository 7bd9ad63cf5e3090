"""Where a service's handlers run, and a worker's own consumer timeout.

- ``executor="process"``: a pool process imports the handler by name, so
  what goes to the pool is the module-level function itself, never a wrapper
  the service builds around it. Resources, the ServiceContext and the
  Delivery stay in the service's process: a process handler that asks for
  one is refused when it is declared (:class:`ServiceError`), and one the
  pool could not find by name is refused by the check at startup.
- a plain ``def`` subscriber, worker or RPC method runs in a thread, with
  its resources.
- ``consumer_timeout=``: the queue's ``x-consumer-timeout`` on RabbitMQ 3.12+
  (4.x), else the node's setting holds and the service says so.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from amqpkit import (
    Broker,
    BrokerSettings,
    Delivery,
    Exchange,
    Publisher,
    ReconnectPolicy,
    RetryPolicy,
    RpcClient,
    Subscriber,
    TaskContext,
    WorkQueue,
)
from amqpkit.patterns.work_queue import TASK_EVENTS_EXCHANGE
from amqpkit.service import Service, ServiceContext, ServiceError
from amqpkit.service.plan import build_plan

from .. import long_task_handlers as handlers
from ..brokerctl import listed, vhost_args
from ..waiting import wait_for
from .test_run_cli import Run

FAST = RetryPolicy(max_attempts=3, initial_delay=0.2, multiplier=1, jitter=0)


class Pool:
    """Stands in for a database pool: a resource of the service."""


def short_heartbeat(url: str) -> BrokerSettings:
    return BrokerSettings(
        url=url, heartbeat=2, connect_timeout=5, publish_timeout=15,
        reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=1.0, jitter=0.1),
    )  # fmt: skip


async def drop(broker: Broker, *queues: str) -> None:
    for q in queues:
        await broker.delete_queue(q)


# ---------------------------------------------------------------- the process executor in a service


async def test_a_cpu_bound_worker_on_the_process_executor_completes_each_task_once(
    amqp_url: str, broker: Broker, name: str, tmp_path: Path
) -> None:
    """Pure-Python work for 4 s per task on a 2 s heartbeat: in the loop it would cost the connection."""
    log = str(tmp_path / "runs.log")
    svc = Service(f"{name}.svc")
    svc.worker(f"{name}.cpu", concurrency=2, executor="process", processes=2, retry=FAST)(handlers.crunch)
    try:
        async with svc.serve(short_heartbeat(amqp_url)) as running:
            worker = running.workers[f"{handlers.__name__}:crunch"]
            assert worker._handler.fn is handlers.crunch  # the function itself goes to the pool
            assert worker._handler.runs_on == "process"
            work = running.context.work_queue(f"{name}.cpu")
            for n in range(3):
                await work.enqueue({"n": n, "seconds": 4, "log": log})
            await wait_for(lambda: worker.completed == 3, timeout=90)
            assert (worker.retried, worker.dead_lettered) == (0, 0)
            assert running.broker.reconnects == 0
        assert sorted(line.split(" pid=")[0] for line in handlers.runs(log)) == ["run 0", "run 1", "run 2"]
        assert len(handlers.runs(log, "done")) == 3
        assert (await broker.queue_counts(f"{name}.cpu"))[0] == 0
    finally:
        await drop(broker, f"{name}.cpu", f"{name}.cpu.dlq")


async def test_a_process_worker_reports_progress_through_its_task_context(
    settings: BrokerSettings, broker: Broker, name: str
) -> None:
    svc = Service(f"{name}.svc")
    svc.worker(f"{name}.cpu", executor="process", processes=1, events=True)(handlers.report_progress)
    events: list[dict[str, Any]] = []

    async def on_event(event: dict[str, Any]) -> None:
        events.append(event)

    watch = Subscriber(broker, TASK_EVENTS_EXCHANGE, on_event, binding_keys=[f"{name}.cpu.progress"])
    try:
        async with watch, svc.serve(settings) as running:
            task_id = await running.context.work_queue(f"{name}.cpu").enqueue({"n": 1})
            await wait_for(lambda: any(e["progress"] == 1.0 for e in events), timeout=60)
        assert events[-1]["note"] == f"done {task_id}", events
        assert all(e["task_id"] == task_id and e["status"] == "progress" for e in events), events
    finally:
        await drop(broker, f"{name}.cpu", f"{name}.cpu.dlq")


# ---------------------------------------------------------------- refused when declared


def needs_context(job: dict[str, Any], ctx: ServiceContext) -> None: ...


def needs_pool(job: dict[str, Any], pool: Pool) -> None: ...


def needs_two(job: dict[str, Any], pool: Pool, ctx: ServiceContext, task: TaskContext) -> None: ...


def wants_the_delivery(delivery: Delivery[dict[str, Any]]) -> None: ...


def wants_nothing_it_cannot_have(job: dict[str, Any], task: TaskContext, retries: int = 3) -> int:
    return retries


@pytest.mark.parametrize(
    ("handler", "says"),
    [
        (needs_context, r"cannot be given ctx \(ServiceContext\)"),
        (needs_pool, r"cannot be given pool \(Pool\)"),  # refused even before the resource is declared
        (needs_two, r"cannot be given pool \(Pool\), ctx \(ServiceContext\)\. Resources and the ServiceContext"),
        (wants_the_delivery, r"gets the message's value, not the Delivery"),
        (lambda job: None, r"make it a module-level function"),
    ],
)
def test_a_process_handler_is_refused_when_it_is_declared(handler: Callable[..., Any], says: str) -> None:
    svc = Service("s")
    with pytest.raises(ServiceError, match=rf"runs in pool processes \(executor='process'\).*{says}"):
        svc.worker("q", executor="process")(handler)
    assert svc.handlers == []  # nothing half-declared


def test_a_local_function_is_refused_for_the_process_executor() -> None:
    svc = Service("s")

    def local(job: dict[str, Any]) -> None: ...

    with pytest.raises(ServiceError, match="make it a module-level function"):
        svc.worker("q", executor="process")(local)
    svc.worker("q")(local)  # in a thread, a local function is fine
    svc.check()


def test_a_process_handler_may_ask_for_its_task_context_and_keep_defaults() -> None:
    svc = Service("s")
    svc.worker("q", executor="process")(wants_nothing_it_cannot_have)
    svc.check()


def _logged(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def logged(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return logged


hidden = Service("hidden")


@_logged
@hidden.worker("q", executor="process")
def hidden_handler(job: dict[str, Any]) -> None:
    """A decorator over @svc.worker: the module's name now holds the wrapper, which the pool finds instead."""


def test_a_process_handler_the_pool_cannot_find_by_name_is_refused_at_the_check() -> None:
    with pytest.raises(ServiceError, match=r"hidden_handler is another object \(a decorator over @svc.worker\?\)"):
        hidden.check()


# ---------------------------------------------------------------- plain def handlers of every kind run in threads


async def test_def_subscriber_worker_and_rpc_run_in_threads_with_their_resources(
    settings: BrokerSettings, broker: Broker, name: str
) -> None:
    svc = Service(f"{name}.svc")
    orders = Exchange(f"{name}.orders", type="topic")
    seen: dict[str, tuple[bool, bool]] = {}  # handler -> (off the loop's thread, got the resource)
    loop_thread = threading.get_ident()

    @svc.resource
    def pool() -> Pool:
        return Pool()

    @svc.subscriber(orders, binding_keys=["#"], queue=f"{name}.orders")
    def on_order(order: dict[str, int], pool: Pool) -> None:
        seen["subscriber"] = (threading.get_ident() != loop_thread, isinstance(pool, Pool))

    @svc.worker(f"{name}.jobs")
    def job(task: dict[str, int], pool: Pool, ctx: ServiceContext) -> None:
        seen["worker"] = (threading.get_ident() != loop_thread, ctx.get(Pool) is pool)

    @svc.rpc(f"{name}.rpc")
    def double(n: int, pool: Pool) -> int:
        seen["rpc"] = (threading.get_ident() != loop_thread, isinstance(pool, Pool))
        return 2 * n

    try:
        async with svc.serve(settings) as running:
            await Publisher(broker, orders).publish({"id": 1}, routing_key="a")
            await running.context.work_queue(f"{name}.jobs").enqueue({"id": 2})
            async with RpcClient(broker, f"{name}.rpc") as rpc:
                assert await rpc.call("double", 21, timeout=15) == 42
            await wait_for(lambda: len(seen) == 3, timeout=30)
        assert seen == {"subscriber": (True, True), "worker": (True, True), "rpc": (True, True)}
    finally:
        await drop(broker, f"{name}.orders", f"{name}.jobs", f"{name}.jobs.dlq", f"{name}.rpc")
        await broker.delete_exchange(orders.name)


# ---------------------------------------------------------------- the watchdog names a service's handler


async def test_an_async_handler_that_blocks_is_named_though_the_service_wraps_it(
    amqp_url: str, broker: Broker, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler given its ServiceContext runs inside a wrapper the service makes; the warning names the handler."""
    caplog.set_level(logging.INFO, logger="amqpkit")
    svc = Service(f"{name}.svc")

    @svc.worker(f"{name}.blocks", concurrency=1)
    async def blocks_with_its_context(job: dict[str, float], ctx: ServiceContext) -> None:
        time.sleep(job["seconds"])  # the mistake the watchdog is there to name

    try:
        async with svc.serve(short_heartbeat(amqp_url)) as running:
            await running.context.work_queue(f"{name}.blocks").enqueue({"seconds": 1.2})
            worker = next(iter(running.workers.values()))
            await wait_for(lambda: worker.completed == 1, timeout=30)
            await wait_for(lambda: any(r.name == "amqpkit.watchdog" for r in caplog.records), timeout=10)
        warnings = [r.getMessage() for r in caplog.records if r.name == "amqpkit.watchdog"]
        assert len(warnings) == 1, warnings
        assert "blocks_with_its_context" in warnings[0], warnings
        assert "test_service_executors.py" in warnings[0], warnings  # the line it blocked on, not the wrapper's
    finally:
        await drop(broker, f"{name}.blocks", f"{name}.blocks.dlq")


# ---------------------------------------------------------------- consumer_timeout


async def _queue_arguments(amqp_url: str, queue: str) -> str:
    return await listed("queues", queue, "arguments", *vhost_args(amqp_url))


async def test_a_worker_s_consumer_timeout_is_its_queue_s_or_the_service_says_why_not(
    amqp_url: str, settings: BrokerSettings, broker: Broker, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqpkit")
    svc = Service(f"{name}.svc")

    @svc.worker(f"{name}.long", consumer_timeout=2 * 3600)
    async def long_job(job: dict[str, int]) -> None: ...

    try:
        async with svc.serve(settings) as running:
            arguments = await _queue_arguments(amqp_url, f"{name}.long")
            started = running.describe()
            await running.context.work_queue(f"{name}.long").enqueue({"n": 1})
            worker = next(iter(running.workers.values()))
            await wait_for(lambda: worker.completed == 1, timeout=30)
        if broker.server_version >= (3, 12):
            assert re.search(r"x-consumer-timeout.{0,10}7200000", arguments), arguments
            assert f"worker on '{name}.long' (consumer_timeout 7200 s)" in started, started
        else:
            assert "x-consumer-timeout" not in arguments, arguments
            version = ".".join(map(str, broker.server_version))
            assert f"(consumer_timeout 7200 s not applied: RabbitMQ {version} has only the node's)" in started
            lines = [
                r.getMessage() for r in caplog.records if "consumer_timeout=7200s is not applied" in r.getMessage()
            ]
            assert len(lines) == 1 and "3.12" in lines[0], caplog.text
        service_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"service {name}.svc")]
        assert any("consumer_timeout 7200 s" in line for line in service_lines), service_lines
    finally:
        await drop(broker, f"{name}.long", f"{name}.long.dlq")


@pytest.mark.usefixtures("spawned")
async def test_amqpkit_run_serves_a_process_worker_and_says_its_consumer_timeout(
    amqp_url: str, broker: Broker, name: str, tmp_path: Path
) -> None:
    """`amqpkit run` on a service whose CPU-bound worker runs in 2 pool processes: each task once, SIGTERM exits 0."""
    log = str(tmp_path / "runs.log")
    run = await Run.start("tests.service.apps:cpu", "--grace", "10", env={"AMQP_URL": amqp_url, "SVC_PREFIX": name})
    try:
        await run.until_err("service cpu running", timeout=60)
        started = next(line for line in run.err if "service cpu running" in line)
        await broker.connect()
        if broker.server_version >= (3, 12):
            assert f"worker on '{name}.cpu' (consumer_timeout 7200 s)" in started, run.text()
        else:
            assert "(consumer_timeout 7200 s not applied: RabbitMQ" in started, run.text()
        work: WorkQueue[Any] = WorkQueue(broker, f"{name}.cpu", consumer_timeout=7200)  # declared as the service does
        for n in range(4):
            await work.enqueue({"n": n, "seconds": 1, "log": log})
        await wait_for(lambda: len(handlers.runs(log, "done")) == 4, timeout=90)
        run.proc.send_signal(signal.SIGTERM)
        assert await run.exit() == 0, run.text()
        assert sorted(line.split(" pid=")[0] for line in handlers.runs(log)) == [f"run {n}" for n in range(4)]
        assert str(run.proc.pid) not in {line.split(" pid=")[1] for line in handlers.runs(log)}  # in the pool
        assert not any("Traceback" in line for line in run.out + run.err), run.text()
        assert (await broker.queue_counts(f"{name}.cpu"))[0] == 0
    finally:
        await drop(broker, f"{name}.cpu", f"{name}.cpu.dlq")


@pytest.mark.parametrize("bad", [0, -1.0])
def test_a_worker_s_consumer_timeout_is_positive_seconds(bad: float) -> None:
    with pytest.raises(ValueError, match="consumer_timeout is in seconds and positive"):
        Service("s").worker("q", consumer_timeout=bad)


async def test_a_service_s_subscriber_and_rpc_method_run_on_the_process_executor(
    settings: BrokerSettings, broker: Broker, name: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "events.log")
    svc = Service(f"{name}.svc")
    events = Exchange(f"{name}.events", type="fanout", durable=False)
    svc.subscriber(events, queue=f"{name}.events", executor="process", processes=1)(handlers.note_event)
    svc.rpc(f"{name}.rpc", "square", executor="process", processes=1)(handlers.square_here)
    try:
        async with svc.serve(settings):
            async with RpcClient(broker, f"{name}.rpc", timeout=30) as rpc:
                reply = await rpc.call("square", 7, returns=dict[str, int])
            assert reply["square"] == 49 and reply["pid"] != os.getpid()
            await Publisher(broker, events).publish({"n": 5, "log": log})
            await wait_for(lambda: len(handlers.runs(log)) == 1, timeout=30)
        assert handlers.runs(log)[0].split(" pid=")[0] == "run 5"
        assert f"pid={os.getpid()}" not in handlers.runs(log)[0]
    finally:
        await drop(broker, f"{name}.events", f"{name}.rpc")
        await broker.delete_exchange(events.name)


def test_a_process_subscriber_or_method_may_not_ask_for_a_resource() -> None:
    svc = Service("refusals")

    @svc.resource
    def pool() -> Pool:
        return Pool()

    with pytest.raises(ServiceError, match=r"subscriber .* runs in pool processes .* cannot be given pool"):
        svc.subscriber("events", executor="process")(handler_with_pool)
    with pytest.raises(ServiceError, match=r"rpc .* runs in pool processes .* cannot be given pool"):
        svc.rpc("requests", executor="process")(handler_with_pool)


def handler_with_pool(event: dict[str, int], pool: Pool) -> None:
    return None


def test_a_worker_s_event_headers_reach_its_work_queue(broker: Broker, name: str) -> None:
    svc = Service(f"{name}.svc")
    svc.worker(f"{name}.jobs", events=True, event_headers=["x-request-id"])(handlers.square)
    plan = build_plan(svc, broker, None)
    ((_, work, _),) = plan.workers
    assert work.event_headers == ("x-request-id",)
