"""Presenting a burst run: totals and the ledger, the per-second table, and the time-series plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .base import Kind
from .burst import BurstRun
from .results import BenchResult

__all__ = ["burst_label", "plot_burst", "print_burst"]


def burst_label(result: BenchResult) -> str:
    p = result.params
    steps = ", then ".join(f"{rate:g}/s for {seconds:g} s" for rate, seconds in p.burst or ())
    limits = f"deadline {p.deadline:g} s"
    if p.service_ms:
        limits += f", {p.service_ms:g} ms of work per request, {p.prefetch} at once per server"
    return f"{steps} ({limits})"


def _first_runs(result: BenchResult) -> list[BurstRun]:
    """Each scenario's first run: the one the per-second table and the plot show."""
    seen: dict[str, BurstRun] = {}
    for run in result.burst:
        seen.setdefault(run.scenario, run)
    return list(seen.values())


def _ms(us: int) -> str:
    return f"{us / 1000:,.1f}" if us < 100_000 else f"{us / 1000:,.0f}"


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def print_burst(result: BenchResult, console: Console) -> None:
    console.print(f"[bold]burst[/bold]: {burst_label(result)}")
    totals = Table(
        title="burst totals (every run). lost: sent one way, never handled. expired / late (event chain): past "
        "its deadline on the way / done after the caller gave up. drained: from the backlog's peak to (nearly) "
        "empty. last done: after the last send"
    )
    for col in (
        "scenario", "run", "sent", "done", "timeouts", "errors", "lost", "expired", "late", "p50 ms", "p99 ms",
        "max ms", "backlog peak", "drained", "last done",
    ):  # fmt: skip
        totals.add_column(col, justify="left" if col == "scenario" else "right", no_wrap=True)
    for run in result.burst:
        lat = run.latency_us
        totals.add_row(
            run.scenario, str(run.run), f"{run.sent:,}", f"{run.completed:,}", f"{run.timeouts:,}", f"{run.errors:,}",
            _count(run.lost), _count(run.expired), _count(run.late), _ms(lat.p50), _ms(lat.p99), _ms(lat.max),
            f"{run.backlog_peak:,} @{run.backlog_peak_at_s:.1f}s",
            "never" if run.drain_s is None else f"{run.drain_s:.1f} s", f"+{run.end_lag_s:.1f} s",
        )  # fmt: skip
    console.print(totals)
    runs = _first_runs(result)
    seconds = max((len(r.seconds) for r in runs), default=0)
    table = Table(title="second by second (first run): completed / failed / p99 ms / backlog (queued in the broker)")
    table.add_column("t s", justify="right")
    table.add_column("target/s", justify="right")
    for run in runs:
        table.add_column(run.scenario, justify="right")
    profile = result.params.burst or ()
    for t in range(seconds):
        row = [str(t), f"{_target(profile, t):g}"]
        for run in runs:
            if t >= len(run.seconds):
                row.append("")
                continue
            s = run.seconds[t]
            queued = f" ({s.queued:,})" if s.queued is not None and run.kind is not Kind.CALL else ""
            row.append(f"{s.completed:,} / {s.failed:,} / {_ms(s.recorder.percentiles().p99)} / {s.backlog:,}{queued}")
        table.add_row(*row)
    console.print(table)


def _target(profile: tuple[tuple[float, float], ...], t: int) -> float:
    elapsed = 0.0
    for rate, seconds in profile:
        if t < elapsed + seconds:
            return rate
        elapsed += seconds
    return 0.0


def plot_burst(result: BenchResult, path: str | Path, plt: Any) -> None:
    """Four panels over time: completed per second (and the offered rate), failed per second, p99, backlog."""
    runs = _first_runs(result)
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    profile = result.params.burst or ()
    horizon = max((len(r.seconds) for r in runs), default=0)
    ts = list(range(horizon))
    axes[0].step(ts, [_target(profile, t) for t in ts], where="post", color="black", linestyle=":", label="offered")
    for run in runs:
        xs = list(range(len(run.seconds)))
        line = axes[0].plot(xs, [s.completed for s in run.seconds], label=run.scenario)[0]
        color = line.get_color()
        axes[1].plot(xs, [s.failed for s in run.seconds], color=color, label=run.scenario)
        p99 = [s.recorder.percentiles().p99 / 1000 if s.completed else float("nan") for s in run.seconds]
        axes[2].plot(xs, p99, color=color, label=run.scenario)
        axes[3].plot(xs, [s.backlog for s in run.seconds], color=color, label=run.scenario)
    axes[0].set_ylabel("completed per second")
    axes[1].set_ylabel("failed per second\n(timeouts, errors)")
    axes[2].set_ylabel("p99 latency (ms)")
    axes[2].set_yscale("log")
    axes[3].set_ylabel("backlog\n(waiting calls or\nunhandled messages)")
    axes[3].set_xlabel("seconds from the start of the profile")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(
        f"amqpkit bench --burst — {result.broker_product} {result.broker_version}, "
        f"{result.machine.get('cpus')} CPUs\n{burst_label(result)}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
