"""Work queues against the real broker: competing workers, retries, dead-lettering, shutdown, DLQ tools."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from amqpkit import (
    Broker,
    Delivery,
    Envelope,
    MemoryIdempotencyStore,
    Reject,
    RetryPolicy,
    TaskStatus,
    Worker,
    WorkQueue,
)
from amqpkit.patterns.dlq import list_dead_letters

from .. import processes
from ..waiting import until_ready, wait_for
from ..worker_app import Job
from .status_events import status_events

FAST = RetryPolicy(max_attempts=3, initial_delay=0.05, multiplier=2, jitter=0)


@pytest.fixture
async def work(broker: Broker, name: str) -> AsyncIterator[WorkQueue[Job]]:
    queue: WorkQueue[Job] = WorkQueue(broker, f"{name}.jobs", retry=FAST)
    yield queue
    for q in [queue.name, queue.dlq_name, *(f"{queue.name}.retry.{ms}" for ms in queue._delay_queues)]:
        with contextlib.suppress(Exception):
            await broker.delete_queue(q)


# Worker and CLI processes end with their test, however it ends.
pytestmark = pytest.mark.usefixtures("spawned")


class WorkerProcess:
    """`amqpkit worker tests.worker_app:handle` as a subprocess, its stdout collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.log: list[str] = []
        # Both pipes are drained all along: a full pipe would block the worker's event loop.
        self._reader = asyncio.ensure_future(self._read())
        self._log_reader = asyncio.ensure_future(self._read_log())

    @classmethod
    async def start(cls, url: str, queue: str, *args: str) -> WorkerProcess:
        proc = await processes.spawn(
            sys.executable, "-m", "amqpkit.cli", "worker", "tests.worker_app:handle", "--queue", queue,
            "--url", url, "--retry-delay", "0.05", "--max-attempts", "3", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        )  # fmt: skip
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(line.decode().strip())

    async def _read_log(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.log.append(line.decode().rstrip())

    def count(self, word: str) -> int:
        return sum(1 for line in self.lines if line.startswith(word + " "))

    def numbers(self, word: str) -> list[int]:
        return [int(line.split()[1]) for line in self.lines if line.startswith(word + " ")]

    async def wait_ready(self, broker: Broker, queue: str, consumers: int) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        while loop.time() < end:
            with contextlib.suppress(Exception):
                if (await broker.queue_counts(queue))[1] >= consumers:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError("worker did not start consuming")

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, float, str]:
        started = time.monotonic()
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        await asyncio.wait_for(self.proc.wait(), timeout)
        took = time.monotonic() - started
        await asyncio.wait_for(asyncio.gather(self._reader, self._log_reader), 5)
        assert self.proc.returncode is not None
        return self.proc.returncode, took, "\n".join(self.log)


@pytest.mark.timeout(300)
async def test_ten_thousand_tasks_four_worker_processes(broker: Broker, work: WorkQueue[Job], amqp_url: str) -> None:
    await work.declare()
    workers = [await WorkerProcess.start(amqp_url, work.name, "--concurrency", "32") for _ in range(4)]
    try:
        await workers[0].wait_ready(broker, work.name, 4)
        sem = asyncio.Semaphore(256)

        async def enqueue(n: int) -> None:
            async with sem:
                await work.enqueue(Job(n=n), task_id=f"t{n}")

        await asyncio.gather(*(enqueue(n) for n in range(10_000)))
        await wait_for(lambda: sum(w.count("done") for w in workers) >= 10_000, timeout=180)
    finally:
        # A graceful stop finishes what is in hand and hands back what is not: after it, every task run
        # is in the output, and anything not acked would be back in the queue (checked below).
        results = [await w.stop() for w in workers]
    done = Counter(n for w in workers for n in w.numbers("done"))
    assert set(done) == set(range(10_000))
    assert max(done.values()) == 1, [n for n, c in done.items() if c > 1][:10]
    shares = [w.count("done") for w in workers]
    assert all(share > 0 for share in shares), shares
    assert all(code == 0 for code, _, _ in results)
    assert await broker.queue_counts(work.name) == (0, 0)


async def test_fails_twice_then_completes_on_attempt_three_with_policy_delays(broker: Broker, name: str) -> None:
    policy = RetryPolicy(max_attempts=5, initial_delay=0.3, multiplier=2, jitter=0)
    work: WorkQueue[Job] = WorkQueue(broker, f"{name}.retry", retry=policy)
    seen: list[tuple[int, float]] = []

    async def handler(delivery: Delivery[Job]) -> None:
        attempt = int(delivery.headers.get("x-attempt", 1))
        seen.append((attempt, time.monotonic()))
        if attempt < 3:
            raise RuntimeError(f"not yet ({attempt})")

    try:
        async with Worker(work, handler, concurrency=4) as worker:
            await work.enqueue(Job(n=1))
            await wait_for(lambda: worker.completed == 1)
        assert [a for a, _ in seen] == [1, 2, 3]
        gaps = [seen[1][1] - seen[0][1], seen[2][1] - seen[1][1]]
        # Policy: 0.3 s, then 0.6 s: never earlier than the delay (the second gap shows the multiplier);
        # later only by the broker's and this machine's latency, for which the bound is generous.
        for gap, delay in zip(gaps, [0.3, 0.6], strict=True):
            assert delay - 0.01 <= gap <= delay + 5, gaps
        assert worker.retried == 2
    finally:
        for q in [work.name, work.dlq_name, f"{work.name}.retry.300", f"{work.name}.retry.600"]:
            await broker.delete_queue(q)


async def test_always_failing_task_is_dead_lettered_with_headers_and_replayed(
    broker: Broker, work: WorkQueue[Job], amqp_url: str
) -> None:
    failing = True

    async def handler(job: Job) -> None:
        if failing:
            raise ValueError(f"cannot do {job.n}")

    async with Worker(work, handler) as worker:
        task_id = await work.enqueue(Job(n=7))
        await wait_for(lambda: worker.dead_lettered == 1)
        assert worker.retried == 2
        (letter,) = await list_dead_letters(broker, work.name)
        assert letter.task_id == task_id
        dead = await broker.get(work.dlq_name)
        assert dead is not None
        h = dead.headers
        assert h["x-error-type"] == "ValueError"
        assert h["x-error-message"] == "cannot do 7"
        assert "Traceback" in h["x-error-traceback"]
        assert "ValueError: cannot do 7" in h["x-error-traceback"]
        assert h["x-attempts"] == 3
        assert h["x-dead-letter-reason"] == "max-attempts"
        assert h["x-first-failure"] <= h["x-last-failure"]
        assert h["x-original-exchange"] == ""
        assert h["x-original-routing-key"] == work.name
        await dead.nack(requeue=True)
        failing = False
        proc = await processes.spawn(
            sys.executable, "-m", "amqpkit.cli", "dlq", "replay", work.name, "--url", amqp_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert "replayed 1 tasks" in out.decode()
        await wait_for(lambda: worker.completed == 1)
    assert (await broker.queue_counts(work.dlq_name))[0] == 0


async def test_malformed_bodies_go_to_the_dlq_at_once(broker: Broker, work: WorkQueue[Job]) -> None:
    done: list[int] = []

    async def handler(job: Job) -> None:
        done.append(job.n)

    bad = [
        Envelope(b"{not json", content_type="application/json", message_id="bad-json"),
        Envelope(b"\x80\x04K\x01.", content_type="application/python-pickle", message_id="bad-pickle"),
        Envelope(b'{"n": "x"}', content_type="application/json", message_id="bad-schema"),
        Envelope(b"", content_type="application/json", message_id="bad-empty"),
    ]
    async with Worker(work, handler) as worker:
        await work.declare()
        for i in range(20):
            await work.enqueue(Job(n=i))
            if i % 5 == 0:
                await broker.publish(bad[i // 5], routing_key=work.name)
        await wait_for(lambda: len(done) == 20 and worker.dead_lettered == 4)
    assert sorted(done) == list(range(20))
    assert worker.retried == 0
    letters = await list_dead_letters(broker, work.name)
    assert [d.task_id for d in letters] == ["bad-json", "bad-pickle", "bad-schema", "bad-empty"]
    assert all(d.reason == "decode-error" and d.error.startswith("DecodeError") for d in letters)
    assert all(d.attempts == 1 for d in letters)


async def test_reject_dead_letters_at_once(broker: Broker, work: WorkQueue[Job]) -> None:
    async def handler(job: Job) -> None:
        raise Reject(f"job {job.n} is not for us")

    async with Worker(work, handler) as worker:
        await work.enqueue(Job(n=3))
        await wait_for(lambda: worker.dead_lettered == 1)
    (letter,) = await list_dead_letters(broker, work.name)
    assert letter.reason == "rejected"
    assert letter.error == "Reject: job 3 is not for us"
    assert worker.retried == 0


async def test_redelivered_completed_task_is_not_run_twice(broker: Broker, work: WorkQueue[Job]) -> None:
    runs: list[int] = []

    async def handler(job: Job) -> None:
        runs.append(job.n)

    async with Worker(work, handler, idempotency=MemoryIdempotencyStore(max_size=10)) as worker:
        await work.enqueue(Job(n=1), task_id="same-id")
        await work.enqueue(Job(n=1), task_id="same-id")
        await wait_for(lambda: worker.completed + worker.duplicates == 2)
    assert runs == [1]
    assert worker.duplicates == 1


async def test_memory_store_is_an_lru() -> None:
    store = MemoryIdempotencyStore(max_size=2)
    for key in ("a", "b", "c"):
        await store.remember(key)
    assert not await store.seen("a")
    assert await store.seen("b")
    assert await store.seen("c")


async def test_status_events(broker: Broker, name: str) -> None:
    work: WorkQueue[Job] = WorkQueue(broker, f"{name}.ev", retry=FAST, events=True)
    attempts = 0

    async def handler(job: Job) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("first try fails")

    async with status_events(broker, work) as seen:
        await work.declare()
        async with Worker(work, handler) as worker:
            task_id = await work.enqueue(Job(n=1))
            await wait_for(lambda: worker.completed == 1 and len(seen) >= 5)
    events = [d.value for d in seen]
    statuses = [e["status"] for e in events]
    assert statuses == ["pending", "running", "retrying", "running", "completed"]
    assert all(e["task_id"] == task_id and e["queue"] == work.name for e in events)
    assert events[2]["error"] == "RuntimeError: first try fails"
    assert events[2]["attempt"] == 1
    assert events[3]["attempt"] == 2
    assert TaskStatus(statuses[-1]) is TaskStatus.COMPLETED


async def test_sigterm_finishes_a_short_task_and_exits_0(broker: Broker, work: WorkQueue[Job], amqp_url: str) -> None:
    worker = await WorkerProcess.start(amqp_url, work.name, "--grace", "5")
    await work.declare()
    await worker.wait_ready(broker, work.name, 1)
    await work.enqueue(Job(n=1, sleep=1.0))
    await wait_for(lambda: worker.count("start") == 1)
    code, took, err = await worker.stop(signal.SIGTERM)
    assert code == 0, err
    assert worker.numbers("done") == [1]
    assert took < 5 + 10  # the grace at most, and the time to exit
    assert await broker.queue_counts(work.name) == (0, 0)


async def test_sigterm_requeues_a_long_task_after_grace(broker: Broker, work: WorkQueue[Job], amqp_url: str) -> None:
    worker = await WorkerProcess.start(amqp_url, work.name, "--grace", "1")
    await work.declare()
    await worker.wait_ready(broker, work.name, 1)
    await work.enqueue(Job(n=2, sleep=30))
    await wait_for(lambda: worker.count("start") == 1)
    code, took, err = await worker.stop(signal.SIGTERM)
    assert code == 0, err
    assert took < 1 + 10  # ended by the grace, well before the 30 s task would have
    assert worker.count("done") == 0
    # Nothing lost: the task is back in the queue, whole.
    await until_ready(broker, work.name, 1)
    got = await broker.get(work.name)
    assert got is not None
    assert json.loads(got.body) == {"n": 2, "sleep": 30.0, "fail": False}
    await got.ack()


async def test_sigkill_mid_task_another_worker_completes_it(
    broker: Broker, work: WorkQueue[Job], amqp_url: str
) -> None:
    first = await WorkerProcess.start(amqp_url, work.name)
    await work.declare()
    await first.wait_ready(broker, work.name, 1)
    await work.enqueue(Job(n=9, sleep=1.5))
    await wait_for(lambda: first.count("start") == 1)
    await first.stop(signal.SIGKILL)
    assert first.count("done") == 0
    second = await WorkerProcess.start(amqp_url, work.name)
    try:
        await wait_for(lambda: second.count("done") == 1, timeout=20)
        assert second.numbers("done") == [9]
    finally:
        code, _, err = await second.stop()
    assert code == 0, err


async def test_dlq_cli_list_keeps_order_and_purge_asks(broker: Broker, work: WorkQueue[Job], amqp_url: str) -> None:
    async def handler(job: Job) -> None:
        raise Reject("no")

    async with Worker(work, handler) as worker:
        for i in range(5):
            await work.enqueue(Job(n=i), task_id=f"task-{i}")
        await wait_for(lambda: worker.dead_lettered == 5)

    async def cli(*args: str, stdin: bytes = b"") -> tuple[int, str]:
        proc = await processes.spawn(
            sys.executable, "-m", "amqpkit.cli", "dlq", *args, work.name, "--url", amqp_url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(stdin), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    for _ in range(2):  # listing twice shows the same, in the same order
        code, out = await cli("list")
        assert code == 0, out
        assert "5 dead-lettered tasks" in out
        positions = [out.index(f"task-{i}") for i in range(5)]
        assert positions == sorted(positions)
    assert [d.task_id for d in await list_dead_letters(broker, work.name)] == [f"task-{i}" for i in range(5)]
    code, out = await cli("replay", "--dry-run", "--limit", "2")
    assert code == 0, out
    assert "would replay 2 tasks" in out
    assert (await broker.queue_counts(work.dlq_name))[0] == 5
    code, out = await cli("purge", stdin=b"n\n")
    assert code != 0
    assert (await broker.queue_counts(work.dlq_name))[0] == 5
    code, out = await cli("purge", "--yes")
    assert code == 0, out
    assert "purged 5 messages" in out
    assert (await broker.queue_counts(work.dlq_name))[0] == 0


async def test_a_stopped_worker_leaves_no_channel_open_and_no_delay_queue_remembered(
    broker: Broker, name: str, cleanup: list[str]
) -> None:
    """The last Worker of a WorkQueue to stop left the channel of its delay-queue renewals open (30 WorkQueues made
    and stopped: 31 channels more, up to channel_max), and the Broker remembered every delay queue it had used: a
    reconnect declared them all again, after they had expired (51 quorum queues, in a hunt)."""
    assert broker._conn is not None
    channels = len(broker._conn.channels)
    for i in range(4):
        work = WorkQueue(broker, f"{name}.{i}", retry=RetryPolicy(max_attempts=2, initial_delay=0.1, jitter=0))
        cleanup += [f"q:{work.name}", f"q:{work.dlq_name}", f"q:{work.name}.retry.100"]
        runs: list[int] = []

        async def handler(task: Delivery[Any], runs: list[int] = runs) -> None:
            runs.append(1)
            if len(runs) == 1:
                raise RuntimeError("fails once")

        worker = Worker(work, handler, concurrency=1)
        await worker.start()
        await work.enqueue({"n": i})
        await wait_for(lambda worker=worker: worker.completed == 1, 15)  # type: ignore[misc]
        delay_queue = work._delay_spec(100)
        assert broker.remembers(delay_queue)
        await worker.stop()
        assert not broker.remembers(delay_queue)
    await asyncio.sleep(0.5)  # the renewals' channels close in the background
    assert len(broker._conn.channels) <= channels + 1, (channels, len(broker._conn.channels))


async def test_a_worker_started_again_while_it_stops_keeps_renewing_its_delay_queues(
    broker: Broker, work: WorkQueue[Job]
) -> None:
    """stop() waits for the tasks still running; a start() meanwhile kept the delay-queue keeper that the stop then
    cancelled, so the worker ran on renewing no delay queue (a retry longer than a queue's expiry would be lost
    with it) and closed its pool under it."""
    release = asyncio.Event()
    running = asyncio.Event()

    async def handler(task: Delivery[Any]) -> None:
        running.set()
        await release.wait()

    worker = Worker(work, handler, concurrency=1, grace=10)
    await worker.start()
    try:
        await work.enqueue(Job(n=1))
        await asyncio.wait_for(running.wait(), 10)
        stopping = asyncio.ensure_future(worker.stop())
        await asyncio.sleep(0.2)  # the stop waits for the running task
        starting = asyncio.ensure_future(worker.start())
        await asyncio.sleep(0.2)
        release.set()
        await asyncio.wait_for(asyncio.gather(stopping, starting), 15)
        keeper = worker._keeper
        assert keeper is not None and not keeper.done(), "the restarted worker renews no delay queue"
        running.clear()
        await work.enqueue(Job(n=2))
        await asyncio.wait_for(running.wait(), 10)
        await wait_for(lambda: worker.completed == 2, 10)
    finally:
        release.set()
        await worker.stop()
