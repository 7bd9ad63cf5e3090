"""The side-by-side ratios say how far the repeats disagree, not only the ratio of their medians."""

from __future__ import annotations

import io

from rich.console import Console

from amqpkit.bench import BenchParams
from amqpkit.bench.report import comparisons, print_report
from amqpkit.bench.results import BenchResult, RunResult
from amqpkit.bench.stats import Percentiles


def _run(scenario: str, repeat: int, throughput: float, p50: int) -> RunResult:
    return RunResult(scenario, 1, None, 10, 128, throughput, Percentiles(p50, p50, p50, p50, p50), 0, run=repeat)


def _result() -> BenchResult:
    # Repeat by repeat, rpc against raw-rpc: p50 1.5x, 0.8x, 1.1x; throughput 0.5x, 1.25x, 0.9x.
    runs = [
        _run("rpc", 0, 500, 1500), _run("raw-rpc", 0, 1000, 1000),
        _run("rpc", 1, 1000, 800), _run("raw-rpc", 1, 800, 1000),
        _run("rpc", 2, 900, 1100), _run("raw-rpc", 2, 1000, 1000),
    ]  # fmt: skip
    params = BenchParams(scenarios=("rpc", "raw-rpc"), concurrency=(1,), repeat=3)
    return BenchResult(params=params, broker_product="RabbitMQ", broker_version="3.10.8", results=runs)


def test_each_ratio_comes_with_the_range_of_the_per_repeat_ratios() -> None:
    (row,) = [row for row in comparisons(_result()) if row["pair"] == "rpc / raw-rpc"]
    assert row["p50_ratio"] == 1.1  # medians 1,100 / 1,000
    assert row["p50_ratio_range"] == (0.8, 1.5)
    assert row["throughput_ratio"] == 0.9  # medians 900 / 1,000
    assert row["throughput_ratio_range"] == (0.5, 1.25)


def test_the_printed_table_shows_the_range() -> None:
    out = io.StringIO()
    print_report(_result(), Console(file=out, width=200))
    line = next(line for line in out.getvalue().splitlines() if "amqpkit RPC vs bare aiormq RPC" in line)
    assert "1.10x [0.80-1.50]" in line
    assert "0.90x [0.50-1.25]" in line
    text = " ".join(out.getvalue().split())  # the title wraps to the table's width
    assert "same run; [lowest-highest ratio of one repeat's runs])" in text  # the title says what [..] is


def test_a_single_run_has_no_range() -> None:
    result = _result()
    result.params = BenchParams(scenarios=("rpc", "raw-rpc"), concurrency=(1,), repeat=1)
    result.results = [r for r in result.results if r.run == 0]
    (row,) = [row for row in comparisons(result) if row["pair"] == "rpc / raw-rpc"]
    assert row["p50_ratio_range"] is None and row["throughput_ratio_range"] is None
