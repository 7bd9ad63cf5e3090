"""Presenting a BenchResult: the table, the comparisons, the plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .report_compare import ratio_text
from .results import BenchResult, RunResult

__all__ = ["comparisons", "plot", "print_report"]

# (left, right, what the ratio says)
PAIRS = (
    ("rpc", "oneway", "RPC vs one-way messaging"),
    ("rpc", "oneway-confirmed", "RPC vs confirmed one-way messaging"),
    ("rpc", "raw-rpc", "amqpkit RPC vs bare aiormq RPC"),
    ("rpc", "raw-rpc-wire", "amqpkit RPC vs bare aiormq sending the same messages"),
    ("raw-rpc-wire", "raw-rpc", "bare aiormq: amqpkit's message properties vs the fewest"),
    ("oneway", "raw-oneway", "amqpkit one-way vs bare aiormq one-way"),
    ("rpc", "aiopika-rpc", "amqpkit RPC vs aio-pika's RPC pattern"),
    ("rpc", "rpc-reply-queue", "direct reply-to vs an exclusive reply queue"),
    ("workqueue", "aiopika-workqueue", "amqpkit work queue vs bare aio-pika consume-and-ack"),
    ("workqueue-sync", "workqueue", "work queue: def in threads vs async def"),
    ("workqueue-process", "workqueue", "work queue: def in processes vs async def"),
    ("rpc", "http-rpc", "amqpkit RPC vs HTTP, the faster client"),
    ("rpc", "grpc-rpc", "amqpkit RPC vs gRPC"),
    ("http-rpc-aiohttp", "http-rpc-httpx", "HTTP: aiohttp's client vs httpx's"),
    ("chain-events", "chain-rpc", "chain: events vs RPC over AMQP"),
    ("chain-events", "chain-http", "chain: events vs HTTP calls"),
    ("chain-rpc", "chain-http", "chain: RPC over AMQP vs HTTP calls"),
)
# A name that stands for the faster of several scenarios, level by level (by median throughput).
FASTEST = {"http-rpc": ("http-rpc-aiohttp", "http-rpc-httpx")}


def _levels(result: BenchResult) -> list[int | float]:
    seen: dict[int | float, None] = {}
    for r in (*result.results, *result.chain):
        if r.level is not None:
            seen[r.level] = None
    return list(seen)


def _names(runs: list[RunResult]) -> list[str]:
    """Scenario names in the order they ran (``rpc@uvloop`` after ``rpc`` when both loops ran)."""
    return list(dict.fromkeys(r.scenario for r in runs))


def _resolve(result: BenchResult, name: str, level: int | float, names: set[str]) -> str | None:
    """The scenario ``name`` stands for at ``level``: itself, or the fastest of those it names."""
    base, at, loop = name.partition("@")
    if base not in FASTEST:
        return name if name in names else None
    ran = [f"{one}{at}{loop}" for one in FASTEST[base] if f"{one}{at}{loop}" in names]
    if not ran:
        return None
    return max(ran, key=lambda one: result.median_of(one, level, lambda r: r.throughput_per_s))


def _level_label(result: BenchResult, level: int | float) -> str:
    return f"{level:g}/s" if result.params.rate is not None else f"c={level}"


def comparisons(result: BenchResult) -> list[dict[str, object]]:
    """For each pair of scenarios run, at each level: median p50 latency ratio and throughput ratio."""
    ordered = _names([*result.results, *result.chain])
    names = set(ordered)
    loops = sorted({"@" + n.partition("@")[2] for n in names if "@" in n})
    pairs = [(f"{left}{at}", f"{right}{at}", meaning + (f" ({at[1:]})" if at else "")) for at in ("", *loops)
             for left, right, meaning in PAIRS]  # fmt: skip
    pairs += [(n, n.partition("@")[0], f"{n.partition('@')[0]}: {n.partition('@')[2]} vs asyncio") for n in ordered
              if "@" in n and n.partition("@")[0] in names]  # fmt: skip
    rows: list[dict[str, object]] = []
    for pair_left, pair_right, meaning in pairs:
        for level in _levels(result):
            left = _resolve(result, pair_left, level, names)
            right = _resolve(result, pair_right, level, names)
            if left is None or right is None or not result.runs(left, level) or not result.runs(right, level):
                continue
            lp50 = result.median_of(left, level, lambda r: r.latency_us.p50)
            rp50 = result.median_of(right, level, lambda r: r.latency_us.p50)
            lthr = result.median_of(left, level, lambda r: r.throughput_per_s)
            rthr = result.median_of(right, level, lambda r: r.throughput_per_s)
            rows.append(
                {
                    "pair": f"{left} / {right}",
                    "meaning": meaning + (f": {right}" if right != pair_right else ""),
                    "level": _level_label(result, level),
                    "p50_ratio": round(lp50 / rp50, 3) if rp50 else None,
                    "throughput_ratio": round(lthr / rthr, 3) if rthr else None,
                    "p50_ratio_range": _ratio_range(result, left, right, level, lambda r: r.latency_us.p50),
                    "throughput_ratio_range": _ratio_range(result, left, right, level, lambda r: r.throughput_per_s),
                }
            )
    return rows


def _ratio_range(
    result: BenchResult, left: str, right: str, level: int | float, metric: Callable[[RunResult], float]
) -> tuple[float, float] | None:
    """The lowest and highest ``left / right`` ratio of one repeat's runs (None with fewer than two repeats).

    Repeats are interleaved, so a repeat's two runs met the same machine; how far the repeats' ratios
    disagree says how much of the ratio of medians is noise.
    """
    rights = {r.run: metric(r) for r in result.runs(right, level)}
    ratios = [metric(r) / rights[r.run] for r in result.runs(left, level) if rights.get(r.run)]
    if len(ratios) < 2:
        return None
    return round(min(ratios), 3), round(max(ratios), 3)


def _spread(result: BenchResult, scenario: str, level: int | float, metric: str) -> str:
    if result.params.repeat < 2:
        return ""
    if metric == "thr":
        lo, hi = result.spread(scenario, level, lambda r: r.throughput_per_s)
        return f" [{lo:,.0f}-{hi:,.0f}]"
    lo, hi = result.spread(scenario, level, lambda r: r.latency_us.p50)
    return f" [{lo:,.0f}-{hi:,.0f}]"


def print_report(result: BenchResult, console: Console | None = None) -> None:
    console = console or Console()
    p = result.params
    console.print(
        f"[bold]amqpkit bench[/bold] — {result.broker_product} {result.broker_version}, "
        f"{result.machine.get('cpus')} CPUs, {p.size}-byte bodies, "
        + (f"open loop at {p.rate:g} msg/s" if p.rate else "burst profile (open loop)" if p.burst else "closed loop")
        + (", calls at one in flight alternating one by one (--paired)" if p.paired else "")
        + f", {' and '.join(p.loop)} event loop"
        + (f", {p.repeat} runs (median \\[min-max])" if p.repeat > 1 else "")
        + (", in one process" if p.inproc else ", server in its own process")
        + (f", otel {p.otel[0]}" if len(p.otel) == 1 else "")
    )
    if result.compare:
        from .report_compare import print_compare

        print_compare(result, console)
        return
    if result.results:
        console.print(_table(result, result.results))
    if result.chain:
        console.print(_table(result, result.chain, title="a chain of services: A -> B -> C -> D, end to end"))
    rows = comparisons(result)
    if rows:
        title = "side by side (ratios of medians, same run"
        # Escaped: rich would take "[lowest-...]" for a style and print nothing of it.
        title += "; \\[lowest-highest ratio of one repeat's runs])" if p.repeat > 1 else ")"
        ratios = Table(title=title)
        for col in ("comparison", "load", "p50 latency ratio", "throughput ratio"):
            ratios.add_column(col)
        for row in rows:
            ratios.add_row(
                str(row["meaning"]), str(row["level"]),
                ratio_text(row["p50_ratio"], row["p50_ratio_range"]),
                ratio_text(row["throughput_ratio"], row["throughput_ratio_range"]),
            )  # fmt: skip
        console.print(ratios)
    if result.burst:
        from .report_burst import print_burst

        print_burst(result, console)


def _table(result: BenchResult, runs: list[RunResult], title: str | None = None) -> Table:
    table = Table(show_lines=False, title=title)
    for col, justify in [
        ("scenario", "left"), ("load", "right"), ("msgs", "right"), ("throughput/s", "right"),
        ("p50 µs", "right"), ("p90", "right"), ("p99", "right"), ("p99.9", "right"), ("max", "right"),
        ("errors", "right"),
    ]:  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for level in _levels(result):
        for scenario in _names(runs):
            run: RunResult | None = result.median(scenario, level)
            if run is None:
                continue
            lat = run.latency_us
            table.add_row(
                scenario, _level_label(result, level), f"{run.messages:,}",
                f"{run.throughput_per_s:,.0f}{_spread(result, scenario, level, 'thr')}",
                f"{lat.p50:,}{_spread(result, scenario, level, 'p50')}", f"{lat.p90:,}", f"{lat.p99:,}",
                f"{lat.p999:,}", f"{lat.max:,}", str(run.errors),
            )  # fmt: skip
        table.add_section()
    return table


def plot(result: BenchResult, path: str | Path) -> None:
    """Latency percentiles against throughput, one line per scenario (needs the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise RuntimeError("plotting needs matplotlib: pip install 'amqpkit[plot]'") from exc
    if result.burst:
        from .report_burst import plot_burst

        plot_burst(result, path, plt)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=False)
    for ax, (metric, title) in zip(axes, [("p50", "median latency"), ("p99", "p99 latency")], strict=True):
        for scenario in _names([*result.results, *result.chain]):
            points = []
            for level in _levels(result):
                run = result.median(scenario, level)
                if run is not None:
                    points.append((run.throughput_per_s, getattr(run.latency_us, metric) / 1000, level))
            if not points:
                continue
            xs, ys, labels = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=scenario)
            for x, y, level in zip(xs, ys, labels, strict=True):
                ax.annotate(_level_label(result, level), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("throughput (messages or calls per second)")
        ax.set_ylabel(f"{metric} latency (ms)")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"amqpkit bench — {result.broker_product} {result.broker_version}, "
        f"{result.machine.get('cpus')} CPUs, {result.params.size}-byte bodies"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
