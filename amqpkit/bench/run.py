"""run_bench(): the benchmark as a pure async function returning a :class:`BenchResult`.

For each scenario the serving side is started once (in its own process
unless ``inproc``; a chain's three services in three), then every load
level runs against it: closed loop at each concurrency of the sweep, open
loop at a fixed rate, or the ``burst`` profile (:mod:`.burst`). Each run
starts with a warm-up whose samples are discarded. With ``repeat`` > 1 the
whole sweep runs again, scenarios interleaved, so that compared figures come
from the same conditions and their spread can be shown. :func:`run_loops`
runs it on each event loop asked for (``asyncio``, ``uvloop``), interleaved.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from ..settings import BrokerSettings
from .base import ClientOptions, ClientSide, ServerOptions, Window
from .burst import run_burst
from .chain import ROLES
from .loads import Operation, closed_loop, open_loop, run_in_loop
from .params import DEFAULT_SCENARIOS, BenchParams
from .results import Arm, BenchResult, RunResult, machine_info
from .scenarios import CLIENTS, SERVERS, is_chain, is_rpc, kind_of, require
from .sides import ChainSide, GroupSide, LocalSide, RemoteSide, Side
from .stats import LatencyRecorder

__all__ = ["DEFAULT_SCENARIOS", "BenchParams", "BenchResult", "RunResult", "run_bench", "run_loops"]

ProgressCallback = Callable[[str, int, int], None]


async def run_bench(
    params: BenchParams,
    *,
    on_progress: ProgressCallback | None = None,
    loop: str | None = None,
    first_run: int = 0,
    arm: Arm | None = None,
) -> BenchResult:
    """Run every scenario at every load level on the running event loop; returns what was measured.

    ``loop`` names that loop for the serving processes (default: the first of ``params.loop``).
    ``arm``: the broker and otel mode to run in (default: ``params.url``, no instrumentation);
    this process is instrumented by the caller (:func:`.compare.run_arms`), the serving ones here.
    Raises :class:`~amqpkit.ConnectError` when no broker answers, and
    :class:`~amqpkit.bench.scenarios.MissingDependency` when a scenario needs the ``bench`` extra.
    """
    from ..connection import Broker

    loop = loop or params.loop[0]
    require(params.scenarios, loop=loop)
    arm = arm or Arm(name="default", target=None, urls=(params.url,), otel=None)
    settings = BrokerSettings(url=arm.client_url)
    result = BenchResult(params=params, machine=machine_info())
    # Fail fast, with the Broker's own clear error, when there is no broker.
    probe = Broker(settings.model_copy(update={"reconnect": settings.reconnect.model_copy(
        update={"connect_attempts": 1})}))  # fmt: skip
    await probe.connect()
    result.broker_product, result.broker_version = probe.server_product

    sides: dict[str, Side] = {}
    clients: dict[str, ClientSide] = {}
    windows: dict[str, Window] = {}
    tag = uuid.uuid4().hex[:8]
    try:
        for scenario in params.scenarios:
            window = None if is_rpc(scenario) else Window()
            side = _side_for(params, arm, scenario, f"amqpkit.bench.{scenario}.{tag}", window, loop)
            sides[scenario] = side
            await side.start()
            if window is not None:
                windows[scenario] = window
            deadline = params.deadline_for(kind_of(scenario))
            client = CLIENTS[scenario](ClientOptions(
                url=arm.client_url, queue=f"amqpkit.bench.{scenario}.{tag}", size=params.size,
                queue_type=params.queue_type, endpoint=side.endpoint, deadline=deadline, prefetch=params.prefetch,
            ))  # fmt: skip
            clients[scenario] = client
            await client.start()
        if params.burst is not None:
            for run in range(first_run, first_run + params.repeat):
                for scenario in params.scenarios:
                    if on_progress is not None:
                        on_progress(f"{scenario} burst", 0, 1)
                    result.burst.append(await run_burst(
                        scenario=scenario, kind=kind_of(scenario), run=run, profile=params.burst,
                        side=sides[scenario], client=clients[scenario], window=windows.get(scenario), probe=probe,
                        warmup=params.warmup_count(), drain_timeout=params.drain_timeout(),
                    ))  # fmt: skip
                    if on_progress is not None:
                        on_progress(f"{scenario} burst", 1, 1)
            return result
        levels: list[tuple[int | None, float | None]] = (
            [(None, params.rate)] if params.rate is not None else [(c, None) for c in params.concurrency]
        )
        for run in range(first_run, first_run + params.repeat):
            for concurrency, rate in levels:
                if params.paired and concurrency == 1:
                    result.results += await _paired_runs(params, sides, clients, run, on_progress)
                    continue
                for scenario in params.scenarios:
                    one = await _one_run(params, scenario, sides[scenario], clients[scenario], windows.get(scenario),
                                         concurrency, rate, run, on_progress, arm.otel)  # fmt: skip
                    (result.chain if is_chain(scenario) else result.results).append(one)
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.stop()
        for side in sides.values():
            with contextlib.suppress(Exception):
                await side.stop()
        with contextlib.suppress(Exception):
            await probe.close()
    return result


def _side_for(params: BenchParams, arm: Arm, scenario: str, queue: str, window: Window | None, loop: str) -> Side:
    options = ServerOptions(
        url=arm.server_url, otel=arm.otel or "", queue=queue, prefetch=params.prefetch, queue_type=params.queue_type,
        stall_ms=params.stall_ms, stall_after=params.stall_after, service_ms=params.service_ms,
        deadline=params.deadline, task_cpu_ms=params.task_cpu_ms,
    )  # fmt: skip
    if params.inproc:

        def local(role: str, following: str) -> Side:
            server = SERVERS[scenario](dataclasses.replace(options, role=role, next_endpoint=following))
            if window is not None:
                server.on_handled = window.handled_some
            return LocalSide(server)

        return ChainSide(local, ROLES) if is_chain(scenario) else local("", "")
    if is_chain(scenario):
        return ChainSide(lambda role, following: RemoteSide.with_role(scenario, options, loop, role, following), ROLES)
    if "workqueue" in scenario and params.workers > 1:
        return GroupSide([RemoteSide(scenario, options, window, loop) for _ in range(params.workers)])
    return RemoteSide(scenario, options, window, loop)


def run_loops(params: BenchParams, *, on_progress: ProgressCallback | None = None) -> BenchResult:
    """:func:`run_bench` on each event loop of ``params.loop``, from synchronous code.

    One loop: one run of the whole bench. Several: for each repeat, the bench
    once on each loop (interleaved, the order turning by one each repeat, as
    :func:`~.compare.run_arms` turns its arms); runs on a loop other than the first are
    named ``SCENARIO@LOOP`` (``rpc@uvloop``), so the JSON keeps its shape.
    """
    if params.otel or len(params.arms()) > 1:
        from .compare import run_arms

        return run_arms(params, on_progress=on_progress)
    if len(params.loop) == 1:
        return run_in_loop(lambda: run_bench(params, on_progress=on_progress), params.loop[0])  # type: ignore[no-any-return]
    merged: BenchResult | None = None
    loops = len(params.loop)
    for run in range(params.repeat):
        for place in range(loops):
            index = (place - run) % loops  # loop i runs at place (i + run) % loops: each takes its turn first
            loop = params.loop[index]
            once = params.model_copy(update={"repeat": 1})

            def once_on(once: BenchParams = once, loop: str = loop, run: int = run) -> Coroutine[Any, Any, BenchResult]:
                return run_bench(once, on_progress=on_progress, loop=loop, first_run=run)

            part: BenchResult = run_in_loop(once_on, loop)
            suffix = f"@{loop}" if index else ""
            if merged is None:
                merged = BenchResult(params=params, broker_product=part.broker_product,
                                     broker_version=part.broker_version, machine=part.machine)  # fmt: skip
            merged.results += [dataclasses.replace(r, scenario=r.scenario + suffix) for r in part.results]
            merged.chain += [dataclasses.replace(r, scenario=r.scenario + suffix) for r in part.chain]
            for b in part.burst:
                b.scenario += suffix
            merged.burst += part.burst
    assert merged is not None
    return merged


async def _one_run(
    params: BenchParams,
    scenario: str,
    side: Side,
    client: ClientSide,
    window: Window | None,
    concurrency: int | None,
    rate: float | None,
    run: int,
    on_progress: ProgressCallback | None,
    otel: str | None = None,
) -> RunResult:
    """One scenario at one load level: warm-up, then the measured messages; what they gave."""
    rpc = is_rpc(scenario)
    label = f"{scenario} " + (f"c={concurrency}" if concurrency else f"rate={rate:g}/s")
    total = _total(params, rate)
    tick = _ticker(params, label, total, rate, on_progress)
    operate = _operation(client, window, concurrency)
    await side.reset()
    await _warm_up(params, operate, concurrency, rate)
    if not rpc:
        await _drain_warm_up(side, window)
    recorder = LatencyRecorder() if rpc else None
    started_ns = time.monotonic_ns()
    sent, errors = await _measure(params, operate, concurrency, rate, total, recorder, tick)
    finished_ns = time.monotonic_ns()
    if recorder is not None:
        measured = recorder.count
        elapsed = (finished_ns - started_ns) / 1e9
    else:
        recorder, measured, errors, elapsed = await _one_way_outcome(
            scenario, side, otel, sent, errors, started_ns, finished_ns
        )
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


async def _paired_runs(
    params: BenchParams,
    sides: dict[str, Side],
    clients: dict[str, ClientSide],
    run: int,
    on_progress: ProgressCallback | None,
) -> list[RunResult]:
    """Every scenario at one call in flight, their calls alternating one by one (``--paired``).

    Round ``i`` makes one call of each scenario, starting with scenario ``i mod n``, so each one goes
    first as often as the others and each round meets the machine as it is then: what moves the
    whole machine from run to run moves them all alike. A scenario's throughput is its calls over
    the time its own calls took.
    """
    names = list(params.scenarios)
    for scenario in names:
        await sides[scenario].reset()
    for _ in range(params.warmup_count()):
        for scenario in names:
            with contextlib.suppress(Exception):
                await clients[scenario].operate(time.monotonic_ns(), True)
    recorders = {scenario: LatencyRecorder() for scenario in names}
    spent = dict.fromkeys(names, 0)
    errors = dict.fromkeys(names, 0)
    total = params.messages or 0
    tick = _ticker(params, f"{' + '.join(names)} c=1 paired", total, None, on_progress)
    for i in range(total):
        first = i % len(names)
        for scenario in names[first:] + names[:first]:
            started = time.monotonic_ns()
            try:
                await clients[scenario].operate(started, False)
            except Exception:
                errors[scenario] += 1
                continue
            took = time.monotonic_ns() - started
            recorders[scenario].record_ns(took)
            spent[scenario] += took
        tick()
    return [
        RunResult(
            scenario=scenario,
            concurrency=1,
            rate=None,
            messages=recorders[scenario].count,
            size=params.size,
            throughput_per_s=recorders[scenario].count / (spent[scenario] / 1e9) if spent[scenario] else 0.0,
            latency_us=recorders[scenario].percentiles(),
            errors=errors[scenario],
            run=run,
            duration_s=spent[scenario] / 1e9,
        )
        for scenario in names
    ]


def _total(params: BenchParams, rate: float | None) -> int:
    """Measured messages of a run: ``messages``, else what ``rate`` sends in ``duration`` (0: a timed closed loop)."""
    if params.messages is not None:
        return params.messages
    assert params.duration is not None
    return int((rate or 0) * params.duration) if rate else 0


def _ticker(
    params: BenchParams, label: str, total: int, rate: float | None, on_progress: ProgressCallback | None
) -> Callable[[], None]:
    """What each measured message calls: progress in messages, or for a timed closed loop in tenths of a second."""
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

    return tick


def _quiet() -> None:
    return None


def _operation(client: ClientSide, window: Window | None, concurrency: int | None) -> Operation:
    """The client's operation; for a one-way closed loop, held to ``concurrency`` messages sent and not yet handled."""
    if window is None or concurrency is None:
        return client.operate
    limit = concurrency

    async def operate(sent_ns: int, warmup: bool) -> None:
        await window.acquire(limit)
        await client.operate(time.monotonic_ns(), warmup)

    return operate


async def _warm_up(params: BenchParams, operate: Operation, concurrency: int | None, rate: float | None) -> None:
    """The warm-up messages, at the run's own load level; their samples are discarded."""
    warm = params.warmup_count()
    if not warm:
        return
    if rate is not None:
        await open_loop(operate, rate=rate, count=warm, warmup=True, recorder=None, tick=_quiet)
    else:
        assert concurrency is not None
        await closed_loop(operate, concurrency=concurrency, count=warm, deadline=None, warmup=True,
                           recorder=None, tick=_quiet)  # fmt: skip


async def _drain_warm_up(side: Side, window: Window | None) -> None:
    """Let a one-way warm-up drain so it does not queue ahead of the measured messages."""
    await side.report(0)
    if window is not None:
        # Every warm-up message handled (bounded: a lost one must not stop the bench), then the
        # window starts again from what was handled: what the warm-up lost does not shrink it.
        waited_until = time.monotonic() + 30
        while window.handled < window.sent and time.monotonic() < waited_until:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    if window is not None:
        window.sent = window.handled


async def _measure(
    params: BenchParams,
    operate: Operation,
    concurrency: int | None,
    rate: float | None,
    total: int,
    recorder: LatencyRecorder | None,
    tick: Callable[[], None],
) -> tuple[int, int]:
    """The measured messages: (sent, errors). RPC latencies go to ``recorder``."""
    if rate is not None:
        return await open_loop(operate, rate=rate, count=total, warmup=False, recorder=recorder,
                               tick=tick)  # fmt: skip
    assert concurrency is not None
    deadline = time.monotonic() + params.duration if params.messages is None and params.duration else None
    return await closed_loop(
        operate, concurrency=concurrency, count=params.messages, deadline=deadline, warmup=False,
        recorder=recorder, tick=tick,
    )  # fmt: skip


async def _one_way_outcome(
    scenario: str, side: Side, otel: str | None, sent: int, errors: int, started_ns: int, finished_ns: int
) -> tuple[LatencyRecorder, int, int, float]:
    """What the serving side measured of one-way messages: (latencies, received, errors, seconds).

    A message sent and not received counts as an error; the run lasts until the last one was handled.
    """
    report = await side.report(sent - errors)
    recorder = LatencyRecorder.decode(report["hist"])
    measured = int(report["received"])
    errors += int(report["errors"]) + max(0, sent - errors - measured)  # lost counts as errors
    _check_traced(scenario, otel, measured, int(report.get("traced", 0)))
    end_ns = max(int(report["last_ns"]), finished_ns) if measured else finished_ns
    return recorder, measured, errors, (end_ns - started_ns) / 1e9


def _check_traced(scenario: str, otel: str | None, measured: int, traced: int) -> None:
    """With ``--otel``, one-way messages carry a ``traceparent`` exactly when the sender was instrumented."""
    if otel is None or scenario.startswith("chain-"):
        return
    wanted = measured if otel != "off" else 0
    if traced != wanted:
        raise RuntimeError(f"{scenario} in otel mode {otel}: {traced} of {measured} messages carried a traceparent")
