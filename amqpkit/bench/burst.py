"""``--burst RATE:SECONDS,...``: an open-loop profile, recorded second by second.

Each scenario is sent the same schedule (for example twice its capacity
for 10 s, then half for 20 s), whatever it does with it. Per second of the
run: how many were sent, completed and failed (timeouts at the caller's
deadline apart from other errors), latency percentiles of what completed
in that second, the backlog (calls waiting for an answer, or messages sent
and not yet handled) and the depth of the broker queues where the
scenario's work waits. Then, for each run: the totals, the ledger (a
message sent one way and never handled is *lost*; the consumer counts
distinct sequence numbers, so a duplicate is not mistaken for a delivery;
an event chain's request that the chain reported past its deadline is
*expired*, and one done after its caller stopped waiting is *late*: known
ends, not lost),
the backlog's peak and how long it took to drain.

Latency counts from each operation's intended send time, as in ``--rate``.
Seconds are counted from the start of the profile; a completion belongs to
the second it happened in; a send to the second it was scheduled in.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..connection import Broker
from .base import ClientSide, Kind, Window
from .loads import closed_loop, schedule
from .sides import Side
from .stats import LatencyRecorder, Percentiles

__all__ = ["BurstRun", "Second", "parse_profile", "profile_seconds", "run_burst"]

SAMPLE_S = 0.1
WARMUP_MAX = 200  # warm-up operations before a burst run, at 8 in flight


def parse_profile(text: str) -> tuple[tuple[float, float], ...]:
    """``"1600:10,400:20"`` -> ((1600.0, 10.0), (400.0, 20.0)); ValueError says what is wrong."""
    steps: list[tuple[float, float]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        rate, sep, seconds = part.partition(":")
        try:
            step = (float(rate), float(seconds))
        except ValueError:
            step = (math.nan, math.nan)
        if not sep or not all(math.isfinite(v) and v > 0 for v in step):
            raise ValueError(f"a burst step is RATE:SECONDS with both above zero, not {part!r}")
        steps.append(step)
    if not steps:
        raise ValueError("a burst profile needs at least one RATE:SECONDS step")
    return tuple(steps)


def profile_seconds(profile: tuple[tuple[float, float], ...]) -> float:
    return sum(seconds for _, seconds in profile)


def target_rate(profile: tuple[tuple[float, float], ...], t: float) -> float:
    elapsed = 0.0
    for rate, seconds in profile:
        if t < elapsed + seconds:
            return rate
        elapsed += seconds
    return 0.0


@dataclass(slots=True)
class Second:
    sent: int = 0
    completed: int = 0
    failed: int = 0
    timeouts: int = 0
    backlog: int = 0
    queued: int | None = None
    recorder: LatencyRecorder = field(default_factory=LatencyRecorder)

    def as_dict(self, t: int, rate: float) -> dict[str, Any]:
        p = self.recorder.percentiles()
        return {
            "t": t, "target_rate": rate, "sent": self.sent, "completed": self.completed, "failed": self.failed,
            "timeouts": self.timeouts, "latency_us": {"p50": p.p50, "p90": p.p90, "p99": p.p99, "max": p.max},
            "backlog": self.backlog, "queued": self.queued,
        }  # fmt: skip


@dataclass(slots=True)
class BurstRun:
    scenario: str
    run: int
    kind: Kind
    profile: tuple[tuple[float, float], ...]
    sent: int = 0
    completed: int = 0
    timeouts: int = 0
    errors: int = 0
    lost: int | None = None
    expired: int | None = None
    late: int | None = None
    duplicates: int | None = None
    latency_us: Percentiles = field(default_factory=lambda: Percentiles(0, 0, 0, 0, 0))
    backlog_peak: int = 0
    backlog_peak_at_s: float = 0.0
    drain_s: float | None = None
    end_lag_s: float = 0.0
    seconds: list[Second] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.timeouts + self.errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "run": self.run, "kind": str(self.kind),
            "sent": self.sent, "completed": self.completed, "failed": self.failed, "timeouts": self.timeouts,
            "errors": self.errors, "lost": self.lost, "expired": self.expired, "late": self.late,
            "duplicates": self.duplicates,
            "latency_us": self.latency_us.as_dict(), "backlog_peak": self.backlog_peak,
            "backlog_peak_at_s": round(self.backlog_peak_at_s, 1),
            "drain_s": None if self.drain_s is None else round(self.drain_s, 1), "end_lag_s": round(self.end_lag_s, 2),
            "seconds": [s.as_dict(t, target_rate(self.profile, t)) for t, s in enumerate(self.seconds)],
        }  # fmt: skip


class _Timeline:
    def __init__(self, origin_ns: int) -> None:
        self.origin_ns = origin_ns
        self.seconds: list[Second] = []

    def at(self, now_ns: int) -> Second:
        index = max(0, (now_ns - self.origin_ns) // 1_000_000_000)
        while len(self.seconds) <= index:
            self.seconds.append(Second())
        return self.seconds[index]


async def run_burst(
    *,
    scenario: str,
    kind: Kind,
    run: int,
    profile: tuple[tuple[float, float], ...],
    side: Side,
    client: ClientSide,
    window: Window | None,
    probe: Broker,
    warmup: int,
    drain_timeout: float,
) -> BurstRun:
    """One scenario through the whole profile, then until its backlog drained (or ``drain_timeout``)."""
    result = BurstRun(scenario=scenario, run=run, kind=kind, profile=profile)
    warmup = min(warmup, WARMUP_MAX)
    if warmup:

        def nothing() -> None:
            return None

        handled = window.handled if window is not None else 0
        await closed_loop(client.operate, concurrency=8, count=warmup, deadline=None, warmup=True, recorder=None,
                          tick=nothing)  # fmt: skip
        if window is not None:  # the warm-up must not be queued ahead of the profile
            loop = asyncio.get_running_loop()
            end = loop.time() + drain_timeout
            while window.handled - handled < warmup and loop.time() < end:  # noqa: ASYNC110 - a counter
                await asyncio.sleep(0.01)
    origin = time.monotonic_ns() + 50_000_000
    await side.reset(origin)
    timeline = _Timeline(origin)
    overall = LatencyRecorder()
    handled_before = window.handled if window is not None else 0
    started = finished = 0
    samples: list[tuple[float, int]] = []
    last_completion_ns = 0
    last_send_ns = 0
    before = {counter: int(getattr(client, counter, 0)) for counter in ("expired", "late", "unasked")}

    def since(counter: str) -> int:
        return int(getattr(client, counter, 0)) - before[counter]

    def backlog() -> int:
        if kind is Kind.ONEWAY:
            assert window is not None
            return result.sent - (window.handled - handled_before)
        return started - finished

    async def one(intended: int) -> None:
        nonlocal started, finished, last_completion_ns, last_send_ns
        last_send_ns = max(last_send_ns, intended)
        timeline.at(intended).sent += 1
        started += 1
        try:
            await client.operate(intended, False)
        except Exception as exc:
            now = time.monotonic_ns()
            second = timeline.at(now)
            second.failed += 1
            if isinstance(exc, TimeoutError):
                second.timeouts += 1
                result.timeouts += 1
            else:
                result.errors += 1
            return
        finally:
            finished += 1
        now = time.monotonic_ns()
        if kind is Kind.ONEWAY:
            result.sent += 1  # published; the consumer says whether it arrived
        else:
            result.completed += 1
            second = timeline.at(now)
            second.completed += 1
            second.recorder.record_ns(now - intended)
            overall.record_ns(now - intended)
            last_completion_ns = max(last_completion_ns, now)

    sampling = asyncio.ensure_future(_sample(timeline, samples, backlog, probe, client.watched_queues()))
    try:
        await asyncio.sleep(max(0, origin - time.monotonic_ns()) / 1e9)
        await schedule(one, origin, list(profile))
        if kind is Kind.ONEWAY:
            report = await side.report(result.sent, timeout=drain_timeout)
            _merge_consumer(result, timeline, overall, report)
            last_completion_ns = int(report["last_ns"])
        elif kind is Kind.EVENTS:
            unheard = lambda: started - result.errors - result.completed - since("expired") - since("late")  # noqa: E731
            await _hear_every_fate(unheard, drain_timeout)
        await asyncio.sleep(SAMPLE_S * 2)  # one more sample of the empty backlog
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
    _ledger(result, started, since)
    result.latency_us = overall.percentiles()
    result.seconds = timeline.seconds
    _drain(result, samples, origin)
    result.end_lag_s = max(0.0, (last_completion_ns - last_send_ns) / 1e9) if last_completion_ns else 0.0
    return result


def _ledger(result: BurstRun, started: int, since: Callable[[str], int]) -> None:
    """What was sent, and for messaging how each one ended; ``since(counter)``: the client's count this run."""
    if result.kind is Kind.CALL:
        result.sent = started  # a call that failed was sent all the same
        return
    if result.kind is Kind.EVENTS:
        # Published unless publishing itself failed; a request not heard back by the end is lost.
        result.sent = started - result.errors
        result.expired = since("expired")  # the chain said so: the request's deadline passed on the way
        result.late = since("late")  # done, after A had stopped waiting
        result.duplicates = since("unasked")
    result.lost = max(0, result.sent - result.completed - (result.expired or 0) - (result.late or 0))


async def _hear_every_fate(unheard: Callable[[], int], timeout: float) -> None:
    """Waits (at most ``timeout``) until every request of an event chain was heard back: done or expired."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while unheard() > 0 and loop.time() < end:  # noqa: ASYNC110 - counters moved by the subscriber
        await asyncio.sleep(0.01)


def _merge_consumer(result: BurstRun, timeline: _Timeline, overall: LatencyRecorder, report: dict[str, Any]) -> None:
    """A one-way run's completions, as the consumer counted them, into the driver's timeline."""
    for second, (count, hist) in report.get("series", {}).items():
        entry = timeline.at(timeline.origin_ns + int(second) * 1_000_000_000)
        recorder = LatencyRecorder.decode(hist)
        entry.completed += int(count)
        entry.recorder.merge(recorder)
        overall.merge(recorder)
    result.completed = int(report.get("distinct", report["received"]))
    result.duplicates = int(report.get("duplicates", 0))
    result.errors += int(report["errors"])


def _drain(result: BurstRun, samples: list[tuple[float, int]], origin_ns: int) -> None:
    """Backlog peak, when it was, and how long from then until it was back to (nearly) nothing."""
    if not samples:
        return
    peak_at, peak = max(samples, key=lambda s: s[1])
    result.backlog_peak = peak
    result.backlog_peak_at_s = peak_at
    if peak == 0:
        result.drain_s = 0.0
        return
    floor = max(10, peak // 50)
    for t, depth in samples:
        if t > peak_at and depth <= floor:
            result.drain_s = t - peak_at
            return


async def _sample(
    timeline: _Timeline,
    samples: list[tuple[float, int]],
    backlog: Any,
    probe: Broker,
    queues: tuple[str, ...],
) -> None:
    """The backlog every 0.1 s; the broker's queue depth once a second (messages ready in ``queues``)."""
    tick = 0
    while True:
        await asyncio.sleep(SAMPLE_S)
        now = time.monotonic_ns()
        if now < timeline.origin_ns:
            continue
        depth = int(backlog())
        samples.append(((now - timeline.origin_ns) / 1e9, depth))
        second = timeline.at(now)
        second.backlog = max(second.backlog, depth)
        tick += 1
        if queues and tick % 10 == 0:
            total = 0
            for name in queues:
                with contextlib.suppress(Exception):  # a queue gone is an empty one
                    total += (await probe.queue_counts(name))[0]
            second.queued = total
