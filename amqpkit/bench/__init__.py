"""``amqpkit bench``: RPC against one-way messaging, HTTP and gRPC, under bursts and down a chain, measured honestly."""

from .results import BenchResult, RunResult
from .run import DEFAULT_SCENARIOS, BenchParams, run_bench, run_loops
from .scenarios import SCENARIOS, MissingDependency

__all__ = [
    "DEFAULT_SCENARIOS", "SCENARIOS", "BenchParams", "BenchResult", "MissingDependency", "RunResult", "run_bench",
    "run_loops",
]  # fmt: skip
