"""Presenting a comparison (``--target``, ``--otel``): every arm side by side, and its ratios to the first."""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.table import Table

from ..settings import redact_url
from .results import ArmResult, BenchResult, RunResult, arm_ratios

__all__ = ["print_compare"]


def _runs(arm: ArmResult, scenario: str, concurrency: int | None, rate: float | None) -> list[RunResult]:
    key = (scenario, concurrency, rate)
    return [r for r in (*arm.results, *arm.chain) if (r.scenario, r.concurrency, r.rate) == key]


def _figure(runs: list[RunResult], spread: bool) -> tuple[str, str]:
    if not runs:
        return "-", "-"
    throughput = [r.throughput_per_s for r in runs]
    p50 = [r.latency_us.p50 for r in runs]
    thr = f"{statistics.median(throughput):,.0f}"
    lat = f"{statistics.median(p50):,.0f}"
    if spread and len(runs) > 1:
        thr += f"\n\\[{min(throughput):,.0f}-{max(throughput):,.0f}]"  # the spread below the median
    return thr, lat


def ratio_text(ratio: object, spread: object = None, *, sep: str = " ") -> str:
    """A ratio as ``1.10x``; with ``spread``, the (low, high) of the per-repeat ratios: ``1.10x [0.80-1.50]``."""
    if not isinstance(ratio, float | int):
        return "-"
    text = f"{ratio:.2f}x"
    if isinstance(spread, tuple) and len(spread) == 2:
        text += f"{sep}\\[{spread[0]:.2f}-{spread[1]:.2f}]"  # rich reads [..] as markup unless escaped
    return text


def _ratio(summary: dict[str, float] | None, spread: bool) -> str:
    if summary is None:
        return "-"
    if spread and summary["min"] != summary["max"]:
        return ratio_text(summary["median"], (summary["min"], summary["max"]), sep="\n")
    return ratio_text(summary["median"])


def print_compare(result: BenchResult, console: Console) -> None:
    arms = result.compare
    spread = result.params.repeat > 1
    for part in arms:
        arm = part.arm
        where = ", ".join(redact_url(u) for u in arm.urls)
        mode = f", otel {arm.otel}" if arm.otel else ""
        loads = "; ".join(" ".join(f"{x:g}" for x in load) for load in part.load_avg_at_start)
        console.print(f"  [bold]{arm.name}[/bold]: {part.broker_product} {part.broker_version} at {where}{mode}"
                      f" (load at start of each run: {loads})")  # fmt: skip
    reference = arms[0].arm.name
    over = " median \\[min-max]" if spread else ""  # rich reads [..] as markup unless escaped
    table = Table(title=f"side by side: throughput/s{over} and p50 µs; ratios to {reference}, per repeat{over}")
    table.add_column("scenario")
    table.add_column("load", justify="right")
    for part in arms:
        table.add_column(f"{part.arm.name} thr/s", justify="right")
        table.add_column("p50", justify="right")
    for part in arms[1:]:
        table.add_column(f"{part.arm.name} thr", justify="right")
        table.add_column("p50", justify="right")
    ratios = {(r["arm"], r["scenario"], r["concurrency"], r["rate"]): r for r in arm_ratios(arms)}
    first = arms[0]
    keys = list(dict.fromkeys((r.scenario, r.concurrency, r.rate) for r in (*first.results, *first.chain)))
    keys.sort(key=lambda k: (k[1] or 0, k[2] or 0))  # load by load, scenarios in the order they ran
    level = None
    for scenario, concurrency, rate in keys:
        if level is not None and level != (concurrency, rate):
            table.add_section()
        level = (concurrency, rate)
        cells = [scenario, f"c={concurrency}" if concurrency else f"{rate:g}/s"]
        for part in arms:
            cells += _figure(_runs(part, scenario, concurrency, rate), spread)
        for part in arms[1:]:
            row = ratios.get((part.arm.name, scenario, concurrency, rate))
            cells += [_ratio(row and row["throughput_ratio"], spread), _ratio(row and row["p50_ratio"], spread)]
        table.add_row(*cells)
    console.print(table)
