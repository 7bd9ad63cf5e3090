"""amqpkit bench against its peers (HTTP, gRPC), down a chain of services, on uvloop, and its bad input.

Short runs of each new scenario, servers in processes of their own as in a
real run. Nothing here checks that anything is fast.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest

from amqpkit.bench import BenchParams, MissingDependency, run_bench, run_loops
from amqpkit.bench.report import comparisons, print_report
from amqpkit.bench.scenarios import VALID_NAMES, require

from . import processes
from .test_bench import RESULT_KEYS, check_schema

CHAIN_KEYS = {"services", "service_ms", "prefetch", "results"}


def check_chain_schema(doc: dict[str, Any]) -> None:
    """The ``chain`` section (docs/bench/README.md): closed-loop results of the chain scenarios, end to end."""
    chain = doc["chain"]
    assert set(chain) == CHAIN_KEYS
    assert chain["services"] == ["B", "C", "D"]
    for result in chain["results"]:
        assert set(result) == RESULT_KEYS
        assert result["scenario"].startswith("chain-")
        lat = result["latency_us"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
        assert result["throughput_per_s"] > 0


async def test_http_and_grpc_peers(amqp_url: str) -> None:
    params = BenchParams(url=amqp_url, scenarios=("rpc", "http-rpc", "grpc-rpc"), concurrency=(1, 4), messages=100,
                         warmup=10)  # fmt: skip
    assert params.scenarios == ("rpc", "http-rpc-aiohttp", "http-rpc-httpx", "grpc-rpc")
    result = await run_bench(params)
    doc = result.as_dict()
    check_schema(doc)
    assert "chain" not in doc and "burst" not in doc
    assert {(r.scenario, r.concurrency, r.messages, r.errors) for r in result.results} == {
        (s, c, 100, 0) for s in params.scenarios for c in (1, 4)
    }
    rows = {(row["pair"], row["level"]) for row in comparisons(result)}
    assert ("http-rpc-aiohttp / http-rpc-httpx", "c=1") in rows
    assert ("rpc / grpc-rpc", "c=4") in rows
    # amqpkit RPC against HTTP is compared with the faster of the two HTTP clients, level by level.
    against_http = [
        row
        for row in comparisons(result)
        if str(row["meaning"]).startswith("amqpkit RPC vs HTTP, the faster client: http-rpc-")
    ]
    assert len(against_http) == 2
    for row in against_http:
        level = 1 if row["level"] == "c=1" else 4
        faster = max(("http-rpc-aiohttp", "http-rpc-httpx"),
                     key=lambda s: result.median_of(s, level, lambda r: r.throughput_per_s))  # fmt: skip
        assert row["pair"] == f"rpc / {faster}"


async def test_chains(amqp_url: str) -> None:
    params = BenchParams(url=amqp_url, scenarios=("chain-rpc", "chain-events", "chain-http"), concurrency=(1, 8),
                         messages=60, warmup=5, service_ms=1)  # fmt: skip
    result = await run_bench(params)
    doc = json.loads(result.to_json())
    check_schema(doc)
    assert doc["results"] == []  # chains have their own section
    check_chain_schema(doc)
    assert {(r["scenario"], r["concurrency"], r["messages"], r["errors"]) for r in doc["chain"]["results"]} == {
        (s, c, 60, 0) for s in params.scenarios for c in (1, 8)
    }
    pairs = {row["pair"] for row in comparisons(result)}
    assert {"chain-events / chain-rpc", "chain-rpc / chain-http"} <= pairs


def test_both_event_loops_side_by_side(amqp_url: str) -> None:
    """``--loop asyncio,uvloop``: runs on uvloop are named SCENARIO@uvloop, interleaved with the asyncio ones."""
    params = BenchParams(url=amqp_url, scenarios=("rpc", "raw-rpc"), concurrency=(2,), messages=60, warmup=5,
                         loop=("asyncio", "uvloop"))  # fmt: skip
    result = run_loops(params)
    check_schema(result.as_dict())
    assert [(r.scenario, r.run) for r in result.results] == [
        ("rpc", 0), ("raw-rpc", 0), ("rpc@uvloop", 0), ("raw-rpc@uvloop", 0),
    ]  # fmt: skip
    meanings = {str(row["meaning"]) for row in comparisons(result)}
    assert "amqpkit RPC vs bare aiormq RPC (uvloop)" in meanings
    assert "rpc: uvloop vs asyncio" in meanings


def test_repeats_alternate_the_event_loops(amqp_url: str) -> None:
    params = BenchParams(url=amqp_url, scenarios=("rpc",), concurrency=(1,), messages=20, warmup=2, inproc=True,
                         loop=("asyncio", "uvloop"), repeat=2)  # fmt: skip
    result = run_loops(params)
    # each loop takes its turn first: a fixed order let the first one run on a quieter machine every time
    assert [(r.scenario, r.run) for r in result.results] == [("rpc", 0), ("rpc@uvloop", 0), ("rpc@uvloop", 1),
                                                            ("rpc", 1)]  # fmt: skip


async def _cli(*args: str, code: str = "", timeout: float = 60) -> tuple[int, str, str]:
    """``amqpkit ...`` in a process of its own; ``code`` runs first in it (to hide a library)."""
    program = f"import sys\n{code}\nfrom amqpkit.cli import main\nsys.argv = ['amqpkit', *sys.argv[1:]]\nmain()"
    proc = await processes.spawn(
        sys.executable, "-c", program, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.usefixtures("spawned")
async def test_unknown_scenario_is_one_line_listing_the_valid_ones() -> None:
    code, _out, err = await _cli("bench", "-s", "rpc,carrier-pigeon", "--messages", "10")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: unknown scenario 'carrier-pigeon'")
    for valid in VALID_NAMES:
        assert valid in lines[0]


@pytest.mark.usefixtures("spawned")
async def test_missing_library_names_the_extra(amqp_url: str) -> None:
    # A module set to None in sys.modules cannot be imported: as if grpcio were not installed.
    code, _out, err = await _cli("bench", "--url", amqp_url, "-s", "rpc,grpc-rpc", "--messages", "10",
                                code="sys.modules['grpc'] = None")  # fmt: skip
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "grpc-rpc needs grpcio" in lines[0]
    assert "amqpkit[bench]" in lines[0]


def test_require_names_each_scenario_and_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    hidden = {"aiohttp", "uvloop"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    with pytest.raises(MissingDependency, match=r"amqpkit\[bench\]") as caught:
        require(("rpc", "http-rpc-aiohttp", "chain-http", "grpc-rpc"), loop="uvloop")
    message = str(caught.value)
    assert "--loop uvloop" in message and "chain-http" in message and "http-rpc-aiohttp" in message
    assert "aiohttp" in message and "grpc-rpc" not in message
    require(("rpc", "oneway"))  # AMQP scenarios need nothing more


def test_report_prints_chain_table(amqp_url: str) -> None:
    from rich.console import Console

    from amqpkit.bench.results import BenchResult, RunResult
    from amqpkit.bench.stats import Percentiles

    params = BenchParams(url=amqp_url, scenarios=("chain-rpc", "chain-events"), concurrency=(1,))
    result = BenchResult(params=params, broker_product="RabbitMQ", broker_version="3")
    for name, thr in (("chain-rpc", 100.0), ("chain-events", 150.0)):
        result.chain.append(RunResult(name, 1, None, 10, 128, thr, Percentiles(5, 6, 7, 8, 9), 0))
    console = Console(record=True, width=200)
    print_report(result, console)
    text = console.export_text()
    assert "a chain of services" in text
    assert "chain: events vs RPC over AMQP" in text
