"""Load models: a closed loop (a fixed number in flight) and an open loop (a schedule kept whatever happens)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from .stats import LatencyRecorder

__all__ = ["MAX_OPEN_LOOP_OUTSTANDING", "Operation", "closed_loop", "open_loop", "run_in_loop"]

MAX_OPEN_LOOP_OUTSTANDING = 20_000

Operation = Callable[[int, bool], Awaitable[None]]  # (send time ns, warm-up?) -> done


async def closed_loop(
    operate: Operation,
    *,
    concurrency: int,
    count: int | None,
    deadline: float | None,
    warmup: bool,
    recorder: LatencyRecorder | None,
    tick: Callable[[], None],
) -> tuple[int, int]:
    """``concurrency`` workers, each doing one operation after another. Returns (done, errors)."""
    issued = 0
    errors = 0

    async def worker() -> None:
        nonlocal issued, errors
        while True:
            if count is not None and issued >= count:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            issued += 1
            started = time.monotonic_ns()
            try:
                await operate(started, warmup)
            except Exception:
                errors += 1
                continue
            if recorder is not None:
                recorder.record_ns(time.monotonic_ns() - started)
            tick()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return issued, errors


async def open_loop(
    operate: Operation,
    *,
    rate: float,
    count: int,
    warmup: bool,
    recorder: LatencyRecorder | None,
    tick: Callable[[], None],
) -> tuple[int, int]:
    """Operations started on a fixed schedule, whatever the previous ones are doing.

    Latency counts from each operation's *intended* start, so when the
    system stalls, the operations scheduled behind the stall carry its cost.
    """
    errors = 0

    async def one(intended: int) -> None:
        nonlocal errors
        try:
            await operate(intended, warmup)
        except Exception:
            errors += 1
            return
        if recorder is not None:
            recorder.record_ns(time.monotonic_ns() - intended)
        tick()

    start = time.monotonic_ns() + 1_000_000
    await schedule(one, start, [(rate, count / rate)])
    return count, errors


def planned(start_ns: int, profile: list[tuple[float, float]]) -> list[int]:
    """Intended send times (monotonic ns) for a profile of (rate per second, seconds) steps."""
    times: list[int] = []
    step_start = float(start_ns)
    for rate, seconds in profile:
        count = round(rate * seconds)
        interval = 1e9 / rate
        times.extend(int(step_start + i * interval) for i in range(count))
        step_start += seconds * 1e9
    return times


async def schedule(one: Callable[[int], Awaitable[None]], start_ns: int, profile: list[tuple[float, float]]) -> None:
    """Start ``one(intended)`` at each planned time (never held back by earlier ones), then wait for all."""
    outstanding: set[asyncio.Task[None]] = set()
    for intended in planned(start_ns, profile):
        delay = intended - time.monotonic_ns()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        while len(outstanding) >= MAX_OPEN_LOOP_OUTSTANDING:
            await asyncio.wait(outstanding, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.ensure_future(one(intended))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
    if outstanding:
        await asyncio.wait(outstanding)


def run_in_loop(main: Callable[[], Coroutine[Any, Any, Any]], loop: str) -> Any:
    """``asyncio.run`` on the event loop named: ``asyncio`` (the standard one) or ``uvloop``."""
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    return asyncio.run(main())
