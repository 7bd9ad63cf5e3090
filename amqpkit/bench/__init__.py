"""``amqpkit bench``: RPC against one-way messaging on a real broker, measured honestly."""

from .run import DEFAULT_SCENARIOS, BenchParams, BenchResult, RunResult, run_bench
from .scenarios import SCENARIOS

__all__ = ["DEFAULT_SCENARIOS", "SCENARIOS", "BenchParams", "BenchResult", "RunResult", "run_bench"]
