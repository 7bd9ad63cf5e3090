"""amqpkit bench: it runs, its JSON is well-formed, stalls show, no broker is a clear error.

These tests never check that anything is fast: speed is for the command, not for tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest

from amqpkit.bench import BenchParams, run_bench
from amqpkit.bench.report import comparisons
from amqpkit.bench.scenarios import Window

from . import processes

PERCENTILES = {"p50", "p90", "p99", "p999", "max"}
RESULT_KEYS = {
    "scenario", "concurrency", "rate", "messages", "size", "throughput_per_s", "latency_us", "errors", "run",
    "duration_s",
}  # fmt: skip


async def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 100) -> tuple[int, str, str]:
    """``amqpkit ...`` in a process of its own, ended (with the bench's serving processes) when the test ends."""
    proc = await processes.spawn(
        sys.executable, "-m", "amqpkit.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def check_schema(doc: dict[str, Any]) -> None:
    assert {"amqpkit_version", "broker", "params", "results"} <= set(doc)
    assert isinstance(doc["amqpkit_version"], str)
    assert doc["broker"]["product"] == "RabbitMQ"
    assert isinstance(doc["broker"]["version"], str)
    assert "guest:guest" not in json.dumps(doc["params"])  # the URL is shown without its password
    for result in doc["results"]:
        assert set(result) == RESULT_KEYS
        assert set(result["latency_us"]) == PERCENTILES
        lat = result["latency_us"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
        assert result["throughput_per_s"] > 0
        assert isinstance(result["errors"], int)


@pytest.mark.usefixtures("spawned")
async def test_cli_bench_json_to_stdout(amqp_url: str) -> None:
    code, out, err = await _cli(
        "bench", "--url", amqp_url, "--messages", "300", "--warmup", "50", "--concurrency", "1,8",
        "--scenario", "rpc,oneway,raw-rpc,raw-oneway", "--json", "-",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    check_schema(doc)
    combos = {(r["scenario"], r["concurrency"]) for r in doc["results"]}
    assert combos == {(s, c) for s in ("rpc", "oneway", "raw-rpc", "raw-oneway") for c in (1, 8)}
    assert all(r["messages"] == 300 and r["errors"] == 0 for r in doc["results"])
    assert doc["params"]["concurrency"] == [1, 8]
    # The table and the ratios went to stderr, leaving stdout pure JSON.
    assert "RPC vs one-way messaging" in err


async def test_every_scenario_runs_in_process(amqp_url: str, tmp_path: Any) -> None:
    params = BenchParams(
        url=amqp_url,
        scenarios=("rpc", "rpc-reply-queue", "oneway", "oneway-confirmed", "raw-rpc", "raw-oneway", "aiopika-rpc"),
        concurrency=(4,),
        messages=100,
        warmup=10,
        inproc=True,
        queue_type="quorum",
    )
    result = await run_bench(params)
    check_schema(result.as_dict())
    assert {r.scenario for r in result.results} == set(params.scenarios)
    assert all(r.messages == 100 for r in result.results)
    pairs = {row["pair"] for row in comparisons(result)}
    assert "rpc / raw-rpc" in pairs
    from amqpkit.bench.report import plot  # matplotlib comes with the 'plot' extra, which the set-up installs

    plot(result, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 1000


async def test_workqueue_with_several_worker_processes(amqp_url: str) -> None:
    params = BenchParams(url=amqp_url, scenarios=("workqueue", "aiopika-workqueue"), concurrency=(8,), messages=300,
                         warmup=20, workers=2)  # fmt: skip
    result = await run_bench(params)
    check_schema(result.as_dict())
    assert [(r.scenario, r.messages, r.errors) for r in result.results] == [
        ("workqueue", 300, 0),
        ("aiopika-workqueue", 300, 0),
    ]


@pytest.mark.parametrize("scenario", ["oneway", "rpc"])
async def test_open_loop_shows_a_stall(amqp_url: str, scenario: str) -> None:
    """A handler that stalls 200 ms once: the messages scheduled behind it carry the stall."""
    params = BenchParams(
        url=amqp_url,
        scenarios=(scenario,),
        rate=500,
        messages=400,
        warmup=0,
        stall_ms=200,
        stall_after=100,
        prefetch=1,
    )
    result = await run_bench(params)
    (run,) = result.results
    assert run.errors == 0
    assert run.latency_us.max >= 200_000
    assert run.latency_us.p999 >= 100_000


async def test_repeat_interleaves_and_reports_spread(amqp_url: str) -> None:
    params = BenchParams(url=amqp_url, scenarios=("rpc", "raw-rpc"), concurrency=(2,), messages=100, warmup=10,
                         repeat=2, inproc=True)  # fmt: skip
    result = await run_bench(params)
    assert [(r.scenario, r.run) for r in result.results] == [("rpc", 0), ("raw-rpc", 0), ("rpc", 1), ("raw-rpc", 1)]
    lo, hi = result.spread("rpc", 2, lambda r: r.throughput_per_s)
    assert 0 < lo <= hi


async def test_duration_mode(amqp_url: str) -> None:
    params = BenchParams(url=amqp_url, scenarios=("rpc", "oneway"), concurrency=(2,), duration=1.0, warmup=10,
                         inproc=True)  # fmt: skip
    result = await run_bench(params)
    check_schema(result.as_dict())
    for run in result.results:
        assert run.messages > 10
        assert 0.9 <= run.duration_s < 5


@pytest.mark.usefixtures("spawned")
async def test_no_broker_is_one_line_and_exit_2() -> None:
    code, out, err = await _cli("bench", "--url", "amqp://guest:Hidden1@127.0.0.1:1/", "--messages", "10")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: no broker")
    assert "127.0.0.1:1" in lines[0]
    assert "rabbitmq-server" in lines[0]
    assert "Hidden1" not in err + out


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        BenchParams(scenarios=("nope",))
    with pytest.raises(ValueError, match="concurrency"):
        BenchParams(concurrency=(0,))


async def test_window_bounds_messages_in_flight() -> None:
    window = Window()
    await window.acquire(2)
    await window.acquire(2)
    third = asyncio.ensure_future(window.acquire(2))
    for _ in range(10):  # let it run as far as it can: a window that let it through would finish it here
        await asyncio.sleep(0)
    assert not third.done()
    window.handled_some()
    await asyncio.wait_for(third, 1)
    assert window.sent == 3
