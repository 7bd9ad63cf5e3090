"""What a bench measured: one run's figures, and the whole result with its JSON form."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..settings import redact_url
from .burst import BurstRun
from .stats import Percentiles

if TYPE_CHECKING:
    from .run import BenchParams

__all__ = ["Arm", "ArmResult", "BenchResult", "RunResult", "arm_ratios", "machine_info"]


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


@dataclass(frozen=True, slots=True)
class Arm:
    """One side of a comparison within a run: a broker (``--target``), an otel mode (``--otel``), or both."""

    name: str
    target: str | None
    urls: tuple[str, ...]
    otel: str | None

    @property
    def client_url(self) -> str:
        """Where the driver connects: the first URL."""
        return self.urls[0]

    @property
    def server_url(self) -> str:
        """Where the serving side connects: the second URL of a cluster (so traffic crosses nodes), else the first."""
        return self.urls[1 % len(self.urls)]


@dataclass(slots=True)
class ArmResult:
    arm: Arm
    broker_product: str = ""
    broker_version: str = ""
    results: list[RunResult] = field(default_factory=list)
    chain: list[RunResult] = field(default_factory=list)
    load_avg_at_start: list[list[float]] = field(default_factory=list)  # one per repeat
    positions: list[int] = field(default_factory=list)  # one per repeat: 0 when it ran first in that repeat

    def as_dict(self) -> dict[str, Any]:
        a = self.arm
        doc: dict[str, Any] = {
            "name": a.name, "target": a.target, "otel": a.otel, "urls": [redact_url(u) for u in a.urls],
            "broker": {"product": self.broker_product, "version": self.broker_version},
            "load_avg_at_start": self.load_avg_at_start, "positions": self.positions,
            "results": [r.as_dict() for r in self.results],
        }  # fmt: skip
        if self.chain:
            doc["chain"] = [r.as_dict() for r in self.chain]
        return doc


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def arm_ratios(arms: list[ArmResult]) -> list[dict[str, Any]]:
    """Each arm against the first, scenario by scenario and load by load: per-repeat ratios, summarised.

    Repeat ``n`` of an arm is compared with repeat ``n`` of the first (they ran next to each other), and the
    ratios' median, min and max are given: throughput (higher: the arm is faster) and p50 latency.
    """
    if len(arms) < 2:
        return []
    reference = arms[0]
    ran = [*reference.results, *reference.chain]
    keys = list(dict.fromkeys((r.scenario, r.concurrency, r.rate) for r in ran))
    rows: list[dict[str, Any]] = []
    for arm in arms[1:]:
        theirs = {(r.scenario, r.concurrency, r.rate, r.run): r for r in (*arm.results, *arm.chain)}
        for scenario, concurrency, rate in keys:
            throughput: list[float] = []
            p50: list[float] = []
            for ref in ran:
                if (ref.scenario, ref.concurrency, ref.rate) != (scenario, concurrency, rate):
                    continue
                other = theirs.get((scenario, concurrency, rate, ref.run))
                if other is None:
                    continue
                if ref.throughput_per_s > 0:
                    throughput.append(other.throughput_per_s / ref.throughput_per_s)
                if ref.latency_us.p50 > 0:
                    p50.append(other.latency_us.p50 / ref.latency_us.p50)
            rows.append({
                "arm": arm.arm.name, "to": reference.arm.name, "scenario": scenario, "concurrency": concurrency,
                "rate": rate, "pairs": len(throughput), "throughput_ratio": _summary(throughput),
                "p50_ratio": _summary(p50),
            })  # fmt: skip
    return rows


@dataclass(slots=True)
class BenchResult:
    params: BenchParams
    broker_product: str = ""
    broker_version: str = ""
    results: list[RunResult] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    chain: list[RunResult] = field(default_factory=list)
    burst: list[BurstRun] = field(default_factory=list)
    compare: list[ArmResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        p = self.params
        doc: dict[str, Any] = {
            "amqpkit_version": __version__,
            "broker": {"product": self.broker_product, "version": self.broker_version},
            "params": p.public(),
            "results": [r.as_dict() for r in self.results],
            "machine": self.machine,
        }
        if self.chain:
            doc["chain"] = {
                "services": ["B", "C", "D"], "service_ms": p.service_ms, "prefetch": p.prefetch,
                "results": [r.as_dict() for r in self.chain],
            }  # fmt: skip
        if self.burst:
            doc["burst"] = {
                "profile": [{"rate": rate, "seconds": seconds} for rate, seconds in p.burst or ()],
                "deadline_s": p.deadline, "service_ms": p.service_ms, "prefetch": p.prefetch,
                "drain_timeout_s": p.drain_timeout(), "runs": [r.as_dict() for r in self.burst],
            }  # fmt: skip
        if self.compare:
            by = [axis for axis, given in (("target", p.targets), ("otel", p.otel)) if given]
            doc["compare"] = {
                "by": by, "reference": self.compare[0].arm.name, "arms": [a.as_dict() for a in self.compare],
                "ratios": arm_ratios(self.compare),
            }  # fmt: skip
        return doc

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def runs(self, scenario: str, level: int | float | None) -> list[RunResult]:
        """Every run (one per repeat) of ``scenario`` at ``level`` (point to point or chain)."""
        return [r for r in (*self.results, *self.chain) if r.scenario == scenario and r.level == level]

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
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],  # the machine's other work, 1/5/15 min
    }
