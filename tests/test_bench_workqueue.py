"""amqpkit bench: the work queue's three handler variants (async def, def in threads, def in processes), one run.

Short runs against the real broker, serving sides in processes of their own as in a real run.
Nothing here checks that anything is fast; the CPU knob is checked to reach every variant's handler.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import cast

from amqpkit.bench import BenchParams, run_bench
from amqpkit.bench.base import ServerOptions
from amqpkit.bench.servers import ProcessWorkQueueWorker, spin, task
from amqpkit.executors import ProcessRunner

from .test_bench import check_schema

VARIANTS = ("workqueue", "workqueue-sync", "workqueue-process")


async def test_three_handler_variants_in_one_run(amqp_url: str) -> None:
    params = BenchParams(url=amqp_url, scenarios=VARIANTS, concurrency=(1, 4), messages=40, warmup=10,
                         task_cpu_ms=10)  # fmt: skip
    result = await run_bench(params)
    doc = result.as_dict()
    check_schema(doc)
    assert doc["params"]["task_cpu_ms"] == 10
    assert [(r.scenario, r.concurrency, r.messages, r.errors) for r in result.results] == [
        (s, c, 40, 0) for c in (1, 4) for s in VARIANTS
    ]
    # One task at a time: each took its 10 ms of CPU before it was counted as done, wherever it ran.
    for run in result.results:
        if run.concurrency == 1:
            assert run.latency_us.p50 >= 10_000, run


async def test_the_process_pool_is_started_before_the_first_run(amqp_url: str, name: str) -> None:
    before = set(multiprocessing.active_children())
    side = ProcessWorkQueueWorker(ServerOptions(url=amqp_url, queue=name, prefetch=8))
    await side.start()
    try:
        started = set(multiprocessing.active_children()) - before
        runner = side.worker._handler.runner
        assert runner is not None
        assert len(started) == cast(ProcessRunner, runner).processes >= 1  # every pool process, before any task
    finally:
        await side.stop()
    deadline = time.monotonic() + 10
    while set(multiprocessing.active_children()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(multiprocessing.active_children()) - before


def test_the_task_is_busy_for_its_cpu_time_and_is_found_by_name() -> None:
    started = time.thread_time()
    spin(30)
    assert time.thread_time() - started >= 0.03
    started = time.thread_time()
    task(b"x", cpu_ms=0)
    assert time.thread_time() - started < 0.01
    # A module-level function: the process pool imports it by name.
    assert (task.__module__, task.__qualname__) == ("amqpkit.bench.servers", "task")


def test_the_variants_are_compared_with_the_async_handler() -> None:
    from amqpkit.bench.report import comparisons
    from amqpkit.bench.results import BenchResult, RunResult
    from amqpkit.bench.stats import Percentiles

    def run(scenario: str, throughput: float) -> RunResult:
        return RunResult(scenario, 1, None, 10, 128, throughput, Percentiles(100, 100, 100, 100, 100), 0)

    result = BenchResult(
        params=BenchParams(scenarios=VARIANTS, concurrency=(1,)),
        results=[run("workqueue", 100), run("workqueue-sync", 50), run("workqueue-process", 200)],
    )
    rows = {row["pair"]: row["throughput_ratio"] for row in comparisons(result)}
    assert rows == {"workqueue-sync / workqueue": 0.5, "workqueue-process / workqueue": 2.0}
