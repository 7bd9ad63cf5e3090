"""Retries spread over minutes, at the real delay-queue expiry (60 s): no task is lost to an expired delay queue.

Before delay queues had their lease renewed, a delay queue declared once was
deleted about 60 s later however busy it was, and a retry sent to it after
that was dropped (task B below, failing at t = 75 s, never came back).
Run with ``pytest -m slow tests/patterns/test_work_queue_slow.py -s`` to see the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import defaultdict

import pytest

from amqpkit import Broker, Delivery, Retry, RetryPolicy, TopologyError, Worker, WorkQueue

from ..worker_app import Job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# (seconds after the start, how many attempts fail, the delay asked for by Retry or None for the policy's 1 s)
SCHEDULE: list[tuple[float, int, float | None]] = [
    (0, 1, None),  # task A
    (15, 2, None),
    (30, 1, 2.0),
    (50, 1, None),
    (75, 1, None),  # task B: more than 60 s after the delay queue was first declared
    (95, 2, None),
    (110, 1, 2.0),
    (140, 1, None),  # more than 60 s after the previous retry to the 1 s queue but one
    (155, 3, None),
    (170, 1, 2.0),
]
POLICY = RetryPolicy(max_attempts=5, initial_delay=1, multiplier=1, jitter=0)


async def test_retries_spread_over_minutes_at_the_default_expiry(broker: Broker, name: str) -> None:
    work: WorkQueue[Job] = WorkQueue(broker, f"{name}.slow", retry=POLICY)
    assert work.delay_queue_min_expiry == 60.0
    delay_queues = [f"{work.name}.retry.1000", f"{work.name}.retry.2000"]
    loop = asyncio.get_running_loop()
    started = loop.time()
    failures: dict[str, tuple[int, float | None]] = {}
    attempts: dict[str, list[float]] = defaultdict(list)
    completed: list[str] = []

    async def handler(delivery: Delivery[Job]) -> None:
        task = delivery.message_id or ""
        attempts[task].append(loop.time() - started)
        fails, delay = failures[task]
        if len(attempts[task]) <= fails:
            if delay is not None:
                raise Retry("not yet", delay=delay)
            raise RuntimeError("not yet")
        completed.append(task)

    missing: list[tuple[float, str]] = []
    checks = 0

    async def watch() -> None:
        """Every 5 s: the delay queues declared so far are still there."""
        nonlocal checks
        while True:
            await asyncio.sleep(5)
            for queue in delay_queues:
                if any(queue.endswith(f".{ms}") for ms in work._delay_queues):
                    checks += 1
                    try:
                        await broker.queue_counts(queue)
                    except TopologyError:
                        missing.append((round(loop.time() - started, 1), queue))

    sent: list[str] = []
    try:
        async with Worker(work, handler, concurrency=4) as worker:
            watcher = asyncio.ensure_future(watch())
            try:
                for offset, fails, delay in SCHEDULE:
                    await asyncio.sleep(max(0.0, started + offset - loop.time()))  # the schedule, not a wait
                    task = f"task-{offset:g}s"
                    failures[task] = (fails, delay)
                    sent.append(await work.enqueue(Job(n=int(offset)), task_id=task))
                end = loop.time() + 60
                while len(set(completed)) < len(sent) and loop.time() < end:
                    await asyncio.sleep(0.1)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        stopped = loop.time()
        figures = {
            "ran_s": round(stopped - started, 1),
            "tasks": len(sent),
            "completed": len(set(completed)),
            "duplicates": len(completed) - len(set(completed)),
            "retried": worker.retried,
            "forward_failures": worker.forward_failures,
            "delay_queue_renewals": work.delay_renewals,
            "presence_checks": checks,
            "missing": missing,
            "attempts_s": {t: [round(a, 1) for a in attempts[t]] for t in sent},
        }
        # After the workers stop, nothing renews the delay queues: the broker removes them.
        gone_after: dict[str, float] = {}
        end = loop.time() + 120
        while len(gone_after) < len(delay_queues) and loop.time() < end:
            for queue in delay_queues:
                if queue not in gone_after:
                    try:
                        await broker.queue_counts(queue)
                    except TopologyError:
                        gone_after[queue] = round(loop.time() - stopped, 1)
            await asyncio.sleep(1)
        figures["gone_after_stop_s"] = gone_after
        print("\nslow work-queue figures:", json.dumps(figures, indent=1))
        assert sorted(set(completed)) == sorted(sent), figures
        assert missing == [], figures
        for (_, fails, delay), task in zip(SCHEDULE, sent, strict=True):
            times = attempts[task]
            assert len(times) >= fails + 1, figures
            gaps = [b - a for a, b in itertools.pairwise(times)]
            wanted = delay if delay is not None else POLICY.initial_delay
            # Never early; late by at most a few seconds (a renewal may put a message behind younger ones).
            assert all(wanted - 0.05 <= gap <= wanted + 10 for gap in gaps[:fails]), (task, gaps)
        assert len(gone_after) == len(delay_queues), figures
    finally:
        for queue in [work.name, work.dlq_name, *delay_queues]:
            with contextlib.suppress(Exception):
                await broker.delete_queue(queue)
