"""`amqpkit worker --executor process`: a CPU-bound module-level handler in a pool of processes, from the command line.

The worker runs as a subprocess on the test's vhost; the handler
(``tests.long_task_handlers.crunch``, pure Python holding the GIL) writes a
line per run and per completion to a file, so each task is counted across
processes without the broker.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from amqpkit import Broker, WorkQueue

from . import long_task_handlers as handlers
from .test_logs_events import CliProcess
from .waiting import wait_for

pytestmark = pytest.mark.usefixtures("spawned")  # every process a test starts is ended, whatever the outcome


async def counts_once_detached(broker: Broker, name: str) -> tuple[int, int]:
    """``queue_counts`` once the exited worker's consumer is gone from the queue's count (up to 10 s): RabbitMQ
    4.0 still counted it just after the process had ended, in a CI run beside the 3.10 suite (0, 1)."""
    counts = await broker.queue_counts(name)
    for _ in range(100):
        if counts[1] == 0:
            break
        await asyncio.sleep(0.1)
        counts = await broker.queue_counts(name)
    return counts


def by_task(log: str, what: str = "run") -> dict[str, list[str]]:
    """Task number -> the pids its runs (or completions) were in."""
    seen: dict[str, list[str]] = {}
    for line in handlers.runs(log, what):
        n, pid = re.fullmatch(rf"{what} (\d+) pid=(\d+)", line).groups()  # type: ignore[union-attr]
        seen.setdefault(n, []).append(pid)
    return seen


async def test_cpu_bound_tasks_each_complete_once_in_the_pool_and_sigterm_exits_0(
    amqp_url: str, broker: Broker, name: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "runs.log")
    queue: WorkQueue[Any] = WorkQueue(broker, name)
    cli = await CliProcess.start(
        "worker", "tests.long_task_handlers:crunch", "--queue", name, "--concurrency", "2",
        "--executor", "process", "--pool-size", "2", "--grace", "30", env={"AMQP_URL": amqp_url},
    )  # fmt: skip
    try:
        await cli.until(lambda line: line.startswith("worker on"), stderr=True, timeout=60)
        for n in range(6):
            await queue.enqueue({"n": n, "seconds": 1.5, "log": log})
        await wait_for(lambda: len(handlers.runs(log, "done")) == 6, timeout=120)

        # One more, stopped while it runs: SIGTERM lets it finish within the grace, then the worker exits 0.
        await queue.enqueue({"n": 6, "seconds": 3, "log": log})
        await wait_for(lambda: "6" in by_task(log), timeout=60)
        cli.proc.send_signal(signal.SIGTERM)
        code, err = await cli.wait_exit(timeout=60)
        assert code == 0, err

        runs, done = by_task(log), by_task(log, "done")
        assert {n: len(pids) for n, pids in runs.items()} == {str(n): 1 for n in range(7)}, runs
        assert {n: len(pids) for n, pids in done.items()} == {str(n): 1 for n in range(7)}, done
        pids = {pid for pids in runs.values() for pid in pids}
        assert str(cli.proc.pid) not in pids  # in the pool, not in the worker's own process
        assert 1 <= len(pids) <= 2, pids  # --pool-size 2
        assert cli.err_lines[-1] == "worker stopped: 7 completed, 0 retried, 0 dead-lettered", err
        assert not any("Traceback" in line or " lost" in line for line in cli.lines + cli.err_lines), err
        assert await counts_once_detached(broker, name) == (0, 0)  # nothing given back to run again
    finally:
        await cli.end(timeout=10)
        await broker.delete_queue(name)
        await broker.delete_queue(f"{name}.dlq")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "group-sigterm"])
async def test_a_signal_to_the_whole_process_group_lets_the_running_task_finish(
    amqp_url: str, broker: Broker, name: str, tmp_path: Path, sig: signal.Signals
) -> None:
    # Ctrl-C in a terminal signals every process of the foreground group, and systemd's default
    # KillMode sends SIGTERM to every process of the unit: the pool's processes get it too. They
    # leave the stop to the worker, which lets the running task finish within its grace.
    log = str(tmp_path / "runs.log")
    queue: WorkQueue[Any] = WorkQueue(broker, name)
    cli = await CliProcess.start(
        "worker", "tests.long_task_handlers:crunch", "--queue", name, "--executor", "process", "--pool-size", "1",
        "--grace", "30", env={"AMQP_URL": amqp_url},
    )  # fmt: skip
    try:
        await cli.until(lambda line: line.startswith("worker on"), stderr=True, timeout=60)
        await queue.enqueue({"n": 0, "seconds": 3, "log": log})
        await wait_for(lambda: "0" in by_task(log), timeout=60)
        os.killpg(cli.proc.pid, sig)
        code, err = await cli.wait_exit(timeout=60)
        assert code == 0, err
        assert {n: len(p) for n, p in by_task(log, "done").items()} == {"0": 1}, err
        assert cli.err_lines[-1] == "worker stopped: 1 completed, 0 retried, 0 dead-lettered", err
        assert await counts_once_detached(broker, name) == (0, 0)
    finally:
        await cli.end(timeout=10)
        await broker.delete_queue(name)
        await broker.delete_queue(f"{name}.dlq")
