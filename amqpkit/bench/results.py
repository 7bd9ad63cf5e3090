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
from .burst import BurstRun
from .stats import Percentiles

if TYPE_CHECKING:
    from .run import BenchParams

__all__ = ["BenchResult", "RunResult", "machine_info"]


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
    chain: list[RunResult] = field(default_factory=list)
    burst: list[BurstRun] = field(default_factory=list)

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
