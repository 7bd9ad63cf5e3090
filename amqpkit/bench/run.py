"""run_bench(): the benchmark as a pure async function returning a :class:`BenchResult`.

For each scenario the serving side is started once (in its own process
unless ``inproc``), then every load level runs against it: closed loop at
each concurrency of the sweep, or open loop at a fixed rate. Each run starts
with a warm-up whose samples are discarded. With ``repeat`` > 1 the whole
sweep runs again, scenarios interleaved, so that compared figures come from
the same conditions and their spread can be shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .._version import __version__
from ..settings import BrokerSettings, redact_url
from .scenarios import CLIENTS, SCENARIOS, SERVERS, ClientSide, ServerOptions, ServerSide, Window, is_rpc
from .stats import LatencyRecorder, Percentiles

__all__ = ["DEFAULT_SCENARIOS", "BenchParams", "BenchResult", "RunResult", "run_bench"]

DEFAULT_SCENARIOS = ("rpc", "rpc-reply-queue", "oneway", "oneway-confirmed", "raw-rpc", "raw-oneway")
MAX_OPEN_LOOP_OUTSTANDING = 20_000

ProgressCallback = Callable[[str, int, int], None]


class BenchParams(BaseModel):
    """What to run. Either ``messages`` or ``duration`` bounds each run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    concurrency: tuple[int, ...] = (1, 8, 64)
    rate: float | None = Field(default=None, gt=0)
    messages: int | None = Field(default=None, gt=0)
    duration: float | None = Field(default=None, gt=0)
    warmup: int | None = Field(default=None, ge=0)
    size: int = Field(default=128, ge=0)
    inproc: bool = False
    queue_type: str = "classic"
    repeat: int = Field(default=1, ge=1)
    prefetch: int = Field(default=256, ge=1)
    workers: int = Field(default=1, ge=1, description="worker processes for the workqueue scenarios")
    stall_ms: int = Field(default=0, ge=0)
    stall_after: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> BenchParams:
        unknown = [s for s in self.scenarios if s not in SCENARIOS]
        if unknown:
            raise ValueError(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
        if self.messages is None and self.duration is None:
            object.__setattr__(self, "messages", 5000)
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be at least 1")
        if self.queue_type not in ("classic", "quorum"):
            raise ValueError("queue_type is classic or quorum")
        return self

    def warmup_count(self) -> int:
        if self.warmup is not None:
            return self.warmup
        if self.messages is not None:
            return min(1000, max(50, self.messages // 10))
        return 500

    def public(self) -> dict[str, Any]:
        doc = self.model_dump()
        doc["url"] = redact_url(self.url)
        doc["warmup"] = self.warmup_count()
        return doc


@dataclass(frozen=True, slots=True)
class RunResult:
    scenario: str
    concurrency: int | None
    rate: float | None
    messages: int
    size: int
    throughput_per_s: float
    latency_us: Percentiles
    errors: int
    run: int = 0
    duration_s: float = 0.0

    @property
    def level(self) -> int | float | None:
        """The load: concurrency in closed loop, rate in open loop."""
        return self.concurrency or self.rate

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["latency_us"] = self.latency_us.as_dict()
        doc["throughput_per_s"] = round(self.throughput_per_s, 1)
        doc["duration_s"] = round(self.duration_s, 3)
        return doc


@dataclass(slots=True)
class BenchResult:
    params: BenchParams
    broker_product: str = ""
    broker_version: str = ""
    results: list[RunResult] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "amqpkit_version": __version__,
            "broker": {"product": self.broker_product, "version": self.broker_version},
            "params": self.params.public(),
            "results": [r.as_dict() for r in self.results],
            "machine": self.machine,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def runs(self, scenario: str, level: int | float | None) -> list[RunResult]:
        """Every run (one per repeat) of ``scenario`` at ``level``."""
        return [r for r in self.results if r.scenario == scenario and r.level == level]

    def median(self, scenario: str, level: int | float | None) -> RunResult | None:
        """The run of ``scenario`` at ``level`` with the median throughput (over repeats)."""
        runs = sorted(self.runs(scenario, level), key=lambda r: r.throughput_per_s)
        return runs[len(runs) // 2] if runs else None

    def spread(
        self, scenario: str, level: int | float | None, metric: Callable[[RunResult], float]
    ) -> tuple[float, float]:
        values = [metric(r) for r in self.runs(scenario, level)]
        return (min(values), max(values)) if values else (0.0, 0.0)

    def median_of(self, scenario: str, level: int | float | None, metric: Callable[[RunResult], float]) -> float:
        values = [metric(r) for r in self.runs(scenario, level)]
        return statistics.median(values) if values else 0.0


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }


# ------------------------------------------------------------------ serving sides


class _Side:
    """A serving side, in a subprocess or in this event loop, with one interface."""

    async def start(self) -> None:
        raise NotImplementedError

    async def report(self, expected: int) -> dict[str, Any]:
        raise NotImplementedError

    async def reset(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class _LocalSide(_Side):
    def __init__(self, side: ServerSide) -> None:
        self.side = side

    async def start(self) -> None:
        await self.side.start()

    async def report(self, expected: int) -> dict[str, Any]:
        return await self.side.report(expected)

    async def reset(self) -> None:
        self.side.reset()

    async def stop(self) -> None:
        await self.side.stop()


class _Progress(asyncio.Protocol):
    def __init__(self, window: Window) -> None:
        self.window = window

    def data_received(self, data: bytes) -> None:
        self.window.handled_some(len(data))


class _GroupSide(_Side):
    """Several worker processes on one queue, reported as one."""

    def __init__(self, sides: list[_Side]) -> None:
        self.sides = sides

    async def start(self) -> None:
        for side in self.sides:
            await side.start()

    async def report(self, expected: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        end = loop.time() + 60
        while True:
            reports = [await side.report(0) for side in self.sides]
            received = sum(int(r["received"]) for r in reports)
            if received >= expected or loop.time() > end:
                break
            await asyncio.sleep(0.01)
        merged = LatencyRecorder()
        for r in reports:
            merged.merge(LatencyRecorder.decode(r["hist"]))
        return {
            "received": received,
            "errors": sum(int(r["errors"]) for r in reports),
            "last_ns": max(int(r["last_ns"]) for r in reports),
            "hist": merged.encode(),
        }

    async def reset(self) -> None:
        for side in self.sides:
            await side.reset()

    async def stop(self) -> None:
        for side in self.sides:
            await side.stop()


class _RemoteSide(_Side):
    def __init__(self, scenario: str, options: ServerOptions, window: Window | None) -> None:
        self.scenario = scenario
        self.options = options
        self.window = window
        self.proc: asyncio.subprocess.Process | None = None
        self._transport: asyncio.BaseTransport | None = None

    async def start(self) -> None:
        o = self.options
        pass_fds: tuple[int, ...] = ()
        progress: list[str] = []
        window = self.window
        if window is not None:
            read_fd, write_fd = os.pipe()
            pass_fds = (write_fd,)
            progress = ["--progress-fd", str(write_fd)]
            reader = os.fdopen(read_fd, "rb", buffering=0)
            self._transport, _ = await asyncio.get_running_loop().connect_read_pipe(lambda: _Progress(window), reader)
        args = [
            "-m", "amqpkit.bench.serve", *progress, self.scenario, "--queue", o.queue,
            "--prefetch", str(o.prefetch), "--queue-type", o.queue_type,
            "--stall-ms", str(o.stall_ms), "--stall-after", str(o.stall_after),
        ]  # fmt: skip
        # The URL holds the password: it goes in the environment, which only this user can read,
        # never on the command line, which `ps` shows to everyone.
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, pass_fds=pass_fds, env={**os.environ, "AMQP_URL": o.url},
        )  # fmt: skip
        for fd in pass_fds:
            os.close(fd)  # the child has it now
        await self._read(timeout=60)

    async def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            err = b""
            if self.proc.stderr is not None:
                with contextlib.suppress(TimeoutError):
                    err = await asyncio.wait_for(self.proc.stderr.read(), 5)
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["(nothing on stderr)"]
            raise RuntimeError(f"bench server for {self.scenario} exited: {tail[0]}")
        doc: dict[str, Any] = json.loads(line)
        return doc

    async def _command(self, command: str, timeout: float = 90) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._read(timeout)

    async def report(self, expected: int) -> dict[str, Any]:
        return await self._command(f"report {expected}")

    async def reset(self) -> None:
        await self._command("reset")

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"quit\n")
            await self.proc.stdin.drain()
            await asyncio.wait_for(self.proc.wait(), 15)
        except (TimeoutError, ConnectionError):
            self.proc.kill()
            await self.proc.wait()


# ------------------------------------------------------------------ load models


async def _closed_loop(
    operate: Callable[[int, bool], Awaitable[None]],
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


async def _open_loop(
    operate: Callable[[int, bool], Awaitable[None]],
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
    interval_ns = 1e9 / rate
    errors = 0
    outstanding: set[asyncio.Task[None]] = set()
    start = time.monotonic_ns() + 1_000_000

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

    for i in range(count):
        intended = start + int(i * interval_ns)
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
    return count, errors


# ------------------------------------------------------------------ the bench


async def run_bench(params: BenchParams, *, on_progress: ProgressCallback | None = None) -> BenchResult:
    """Run every scenario at every load level; returns what was measured.

    Raises :class:`~amqpkit.ConnectError` when no broker answers.
    """
    from ..connection import Broker

    settings = BrokerSettings(url=params.url)
    result = BenchResult(params=params, machine=machine_info())
    # Fail fast, with the Broker's own clear error, when there is no broker.
    async with Broker(settings.model_copy(update={"reconnect": settings.reconnect.model_copy(
        update={"connect_attempts": 1})})) as probe:  # fmt: skip
        result.broker_product, result.broker_version = probe.server_product

    sides: dict[str, _Side] = {}
    clients: dict[str, ClientSide] = {}
    windows: dict[str, Window] = {}
    tag = uuid.uuid4().hex[:8]
    try:
        for scenario in params.scenarios:
            queue = f"amqpkit.bench.{scenario}.{tag}"
            options = ServerOptions(
                url=params.url, queue=queue, prefetch=params.prefetch, queue_type=params.queue_type,
                stall_ms=params.stall_ms, stall_after=params.stall_after,
            )  # fmt: skip
            window = None if is_rpc(scenario) else Window()
            side: _Side
            if params.inproc:
                server = SERVERS[scenario](options)
                if window is not None:
                    server.on_handled = window.handled_some
                side = _LocalSide(server)
            elif "workqueue" in scenario and params.workers > 1:
                side = _GroupSide([_RemoteSide(scenario, options, window) for _ in range(params.workers)])
            else:
                side = _RemoteSide(scenario, options, window)
            await side.start()
            if window is not None:
                windows[scenario] = window
            sides[scenario] = side
            client = CLIENTS[scenario](params.url, queue, params.size, params.queue_type)
            await client.start()
            clients[scenario] = client
        levels: list[tuple[int | None, float | None]] = (
            [(None, params.rate)] if params.rate is not None else [(c, None) for c in params.concurrency]
        )
        for run in range(params.repeat):
            for concurrency, rate in levels:
                for scenario in params.scenarios:
                    result.results.append(
                        await _one_run(params, scenario, sides[scenario], clients[scenario], windows.get(scenario),
                                       concurrency, rate, run, on_progress)
                    )  # fmt: skip
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.stop()
        for side in sides.values():
            with contextlib.suppress(Exception):
                await side.stop()
    return result


async def _one_run(
    params: BenchParams,
    scenario: str,
    side: _Side,
    client: ClientSide,
    window: Window | None,
    concurrency: int | None,
    rate: float | None,
    run: int,
    on_progress: ProgressCallback | None,
) -> RunResult:
    rpc = is_rpc(scenario)
    label = f"{scenario} " + (f"c={concurrency}" if concurrency else f"rate={rate:g}/s")
    warm = params.warmup_count()
    if params.messages is not None:
        total = params.messages
    else:
        assert params.duration is not None
        total = int((rate or 0) * params.duration) if rate else 0
    done = 0

    timed = params.messages is None and not rate and params.duration is not None
    run_started = time.monotonic()

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is None:
            return
        if total:
            on_progress(label, min(done, total), total)
        elif timed and done % 100 == 0:  # --duration: progress in tenths of a second
            assert params.duration is not None
            tenths = int(params.duration * 10)
            on_progress(label, min(tenths, int((time.monotonic() - run_started) * 10)), tenths)

    def quiet() -> None:
        return None

    operate = client.operate
    if window is not None and concurrency is not None:
        # One-way closed loop: at most `concurrency` messages sent and not yet handled.
        limit = concurrency

        async def operate(sent_ns: int, warmup: bool) -> None:
            await window.acquire(limit)
            await client.operate(time.monotonic_ns(), warmup)

    await side.reset()
    if warm:
        if rate is not None:
            await _open_loop(operate, rate=rate, count=warm, warmup=True, recorder=None, tick=quiet)
        else:
            assert concurrency is not None
            await _closed_loop(operate, concurrency=concurrency, count=warm, deadline=None, warmup=True,
                               recorder=None, tick=quiet)  # fmt: skip
    if not rpc:
        # Let the warm-up drain so it does not queue ahead of the measured messages.
        await side.report(0)
        await asyncio.sleep(0.05)
        if window is not None:
            window.sent = window.handled  # what the warm-up lost does not shrink the window
    recorder = LatencyRecorder() if rpc else None
    started_ns = time.monotonic_ns()
    if rate is not None:
        sent, errors = await _open_loop(operate, rate=rate, count=total, warmup=False, recorder=recorder,
                                        tick=tick)  # fmt: skip
    else:
        assert concurrency is not None
        deadline = time.monotonic() + params.duration if params.messages is None and params.duration else None
        sent, errors = await _closed_loop(
            operate, concurrency=concurrency, count=params.messages, deadline=deadline, warmup=False,
            recorder=recorder, tick=tick,
        )  # fmt: skip
    finished_ns = time.monotonic_ns()
    if rpc:
        assert recorder is not None
        measured = recorder.count
        elapsed = (finished_ns - started_ns) / 1e9
    else:
        report = await side.report(sent - errors)
        recorder = LatencyRecorder.decode(report["hist"])
        measured = int(report["received"])
        errors += int(report["errors"]) + max(0, sent - errors - measured)  # lost counts as errors
        end_ns = max(int(report["last_ns"]), finished_ns) if measured else finished_ns
        elapsed = (end_ns - started_ns) / 1e9
    if on_progress is not None and total:
        on_progress(label, total, total)
    return RunResult(
        scenario=scenario,
        concurrency=concurrency,
        rate=rate,
        messages=measured,
        size=params.size,
        throughput_per_s=measured / elapsed if elapsed > 0 else 0.0,
        latency_us=recorder.percentiles(),
        errors=errors,
        run=run,
        duration_s=elapsed,
    )
