"""Several brokers, or several instrumentation modes, in one run: ``--target NAME=URL`` and ``--otel MODES``.

Each arm (a target in an otel mode) runs the whole sweep once per repeat, the
arms one after the other within each repeat (interleaved), so a machine whose
load drifts weighs on every arm alike, and in an order turned by one each
repeat (arm ``i`` runs at position ``(i + n) % arms`` in repeat ``n``), so no
arm always runs first or last (docs/bench/README.md has the A/A runs behind
this). Repeat ``n`` of an arm is compared with repeat ``n`` of the first
arm, the reference. An arm's serving sides are
started for its run and stopped after it. The driver is instrumented here,
before each arm's run; the serving processes are started with the same
``--otel`` mode.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine
from typing import Any

from ..settings import redact_url
from .loads import run_in_loop
from .otel import available, set_up
from .results import ArmResult, BenchResult
from .run import BenchParams, ProgressCallback, run_bench
from .scenarios import MissingDependency

__all__ = ["parse_target", "run_arms"]

TARGET_HELP = "NAME=URL, URL one AMQP URL or several separated by commas (a cluster), or NAME=@VAR to read it from VAR"


def parse_target(text: str) -> tuple[str, tuple[str, ...]]:
    """``NAME=URL[,URL...]`` or ``NAME=@VAR`` (the URLs from the environment variable VAR): (name, URLs).

    ValueError with a one-line message that never repeats a password.
    """
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name or "://" in name or not value.strip():
        shown = redact_url(text) if "://" in text else text
        raise ValueError(f"--target takes {TARGET_HELP}; not {shown!r}")
    value = value.strip()
    if value.startswith("@"):
        variable = value[1:]
        if variable not in os.environ:
            raise ValueError(f"--target {name}: the environment variable {variable!r} is not set")
        value = os.environ[variable]
    urls = tuple(u.strip() for u in value.split(",") if u.strip())
    if not urls:
        raise ValueError(f"--target {name}: no URL")
    return name, urls


def run_arms(params: BenchParams, *, on_progress: ProgressCallback | None = None) -> BenchResult:
    """Every arm of ``params`` (:meth:`BenchParams.arms`), interleaved per repeat, from synchronous code.

    The first arm's figures are also the result's ``results`` and ``chain`` (today's schema);
    every arm's, with the ratios to the first, are in ``compare``.
    """
    if any(mode != "off" for mode in params.otel) and not available():
        raise MissingDependency("--otel needs the OpenTelemetry SDK, from the otel extra: pip install 'amqpkit[otel]'")
    arms = params.arms()
    parts = [ArmResult(arm) for arm in arms]
    loop = params.loop[0]
    machine: dict[str, Any] = {}
    try:
        for run in range(params.repeat):
            for place in range(len(parts)):
                part = parts[(place - run) % len(parts)]  # arm i runs at place (i + run) % len(parts)
                part.positions.append(place)
                arm = part.arm
                set_up(arm.otel or "off")
                once = params.model_copy(update={"repeat": 1})
                progress = _prefixed(on_progress, arm.name) if len(arms) > 1 else on_progress

                def once_on(
                    once: BenchParams = once, run: int = run, arm: Any = arm, progress: Any = progress
                ) -> Coroutine[Any, Any, BenchResult]:
                    return run_bench(once, on_progress=progress, loop=loop, first_run=run, arm=arm)

                result: BenchResult = run_in_loop(once_on, loop)
                part.broker_product, part.broker_version = result.broker_product, result.broker_version
                part.results += result.results
                part.chain += result.chain
                part.load_avg_at_start.append(list(result.machine.get("load_avg_at_start", [])))
                machine = machine or result.machine
    finally:
        set_up("off")
    first = parts[0]
    return BenchResult(
        params=params, broker_product=first.broker_product, broker_version=first.broker_version,
        results=list(first.results), chain=list(first.chain), machine=machine,
        compare=parts if len(parts) > 1 else [],
    )  # fmt: skip


def _prefixed(on_progress: ProgressCallback | None, prefix: str) -> ProgressCallback | None:
    if on_progress is None:
        return None
    outer = on_progress

    def progress(label: str, done: int, total: int) -> None:
        outer(f"{prefix}: {label}", done, total)

    return progress
