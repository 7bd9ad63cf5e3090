"""amqpkit bench --burst: an open-loop profile, second by second, with the ledger.

The servers here do 5 ms of work per request, one at a time, so their
capacity is at most 200 per second whatever the machine: a profile of 300/s
for a second builds a backlog of at least 100 requests, half a second of
work, which a caller with a 0.3 s deadline cannot wait for. Nothing here
checks that anything is fast.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from amqpkit.bench.burst import parse_profile

from . import processes

BURST_KEYS = {"profile", "deadline_s", "service_ms", "prefetch", "drain_timeout_s", "runs"}
RUN_KEYS = {
    "scenario", "run", "kind", "sent", "completed", "failed", "timeouts", "errors", "lost", "expired", "late",
    "duplicates", "latency_us", "backlog_peak", "backlog_peak_at_s", "drain_s", "end_lag_s", "seconds",
}  # fmt: skip
SECOND_KEYS = {"t", "target_rate", "sent", "completed", "failed", "timeouts", "latency_us", "backlog", "queued"}


def check_burst_schema(doc: dict[str, Any]) -> None:
    """The ``burst`` section, as docs/bench/README.md documents it."""
    burst = doc["burst"]
    assert set(burst) == BURST_KEYS
    assert all(set(step) == {"rate", "seconds"} for step in burst["profile"])
    for run in burst["runs"]:
        assert set(run) == RUN_KEYS
        assert run["kind"] in ("call", "oneway", "events")
        assert run["failed"] == run["timeouts"] + run["errors"]
        assert set(run["latency_us"]) == {"p50", "p90", "p99", "p999", "max"}
        if run["kind"] == "call":
            assert run["lost"] is None and run["duplicates"] is None
            assert run["sent"] == run["completed"] + run["failed"]
        if run["kind"] != "events":
            assert run["expired"] is None and run["late"] is None
        if run["kind"] == "oneway":
            assert run["lost"] == run["sent"] - run["completed"]
        if run["kind"] == "events":  # every request's end is known: done, expired, done late, or else lost
            assert run["lost"] == run["sent"] - run["completed"] - run["expired"] - run["late"]
        assert [s["t"] for s in run["seconds"]] == list(range(len(run["seconds"])))
        for second in run["seconds"]:
            assert set(second) == SECOND_KEYS
            assert set(second["latency_us"]) == {"p50", "p90", "p99", "max"}
        assert sum(s["completed"] for s in run["seconds"]) == run["completed"]
        assert sum(s["failed"] for s in run["seconds"]) == run["failed"]


def test_profile_parsing() -> None:
    assert parse_profile("1600:10, 400:20") == ((1600.0, 10.0), (400.0, 20.0))
    assert parse_profile("2.5:0.5") == ((2.5, 0.5),)
    for bad in ("", "100", "100:0", "-5:1", "a:b", "100:10,", "100:nan"):
        if bad == "100:10,":
            assert parse_profile(bad) == ((100.0, 10.0),)  # a trailing comma is forgiven
            continue
        with pytest.raises(ValueError, match="RATE:SECONDS"):
            parse_profile(bad)


@pytest.mark.usefixtures("spawned")
async def test_burst_shows_rpc_timeouts_and_messaging_drain(amqp_url: str, tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "burst.json", tmp_path / "burst.png"
    proc = await processes.spawn(
        sys.executable, "-m", "amqpkit.cli", "bench", "-s", "rpc,oneway-confirmed,chain-events",
        "--burst", "300:1,50:1", "--service-ms", "5", "--prefetch", "1", "--deadline", "0.3", "--warmup", "20",
        "--json", str(out_json), "--plot", str(out_png),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "AMQP_URL": amqp_url},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 150)
    assert proc.returncode == 0, err.decode()[-2000:]
    doc = json.loads(out_json.read_text())
    assert doc["results"] == []
    check_burst_schema(doc)
    assert doc["burst"]["profile"] == [{"rate": 300.0, "seconds": 1.0}, {"rate": 50.0, "seconds": 1.0}]
    runs = {run["scenario"]: run for run in doc["burst"]["runs"]}
    assert set(runs) == {"rpc", "oneway-confirmed", "chain-events"}
    assert runs["rpc"]["sent"] == 350
    # RPC: callers past their deadline fail; the rest complete.
    assert runs["rpc"]["timeouts"] > 0
    # Messaging: nothing lost, nothing failed; the backlog built up and drained.
    for name in ("oneway-confirmed", "chain-events"):
        run = runs[name]
        assert (run["sent"], run["completed"], run["lost"], run["failed"]) == (350, 350, 0, 0), run
        assert run["backlog_peak"] >= 50
        assert run["drain_s"] is not None
    assert runs["oneway-confirmed"]["duplicates"] == 0
    # The table and the plot.
    text = out.decode() + err.decode()
    assert "burst totals" in text and "second by second" in text
    assert out_png.stat().st_size > 10_000


async def test_burst_events_that_expire_are_counted_apart_from_lost(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chain-events request whose deadline passed is reported to A as expired: that is known, not lost."""
    from amqpkit.bench.params import BenchParams
    from amqpkit.bench.run import run_bench

    # Events in a burst normally wait as long as the drain; a short wait here makes requests expire in the queues.
    # 50 requests/s of capacity against 400 in one second: those still queued after 3 s expire (about half).
    # The run waits up to its drain timeout (25 s here) to hear every request's end; the test waits longer, so
    # that a request never heard of shows in the ledger as lost instead of as this test's own timeout.
    monkeypatch.setattr(BenchParams, "deadline_for", lambda self, kind: 3.0)
    monkeypatch.setattr(BenchParams, "drain_timeout", lambda self: 25.0)
    params = BenchParams(
        url=amqp_url, scenarios=("chain-events",), burst=parse_profile("400:1"), service_ms=20, prefetch=1,
        warmup=10, inproc=True,
    )  # fmt: skip
    result = await asyncio.wait_for(run_bench(params), 90)
    doc = result.as_dict()
    check_burst_schema(doc)
    (run,) = doc["burst"]["runs"]
    assert run["expired"] > 0 and run["completed"] > 0, run
    assert run["sent"] == 400 and run["lost"] == 0 and run["duplicates"] == 0, run
    assert run["completed"] + run["expired"] + run["late"] == 400, run
