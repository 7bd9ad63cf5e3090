"""amqpkit bench --otel: the same scenarios without instrumentation and with it, in one run, ratios to the first.

What is checked: every arm ran, the driver and the serving processes were instrumented exactly in the
instrumented modes (the serving process says so when ready; one-way messages carry a traceparent), and
the driver is left uninstrumented. Never how much instrumentation costs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from amqpkit import telemetry
from amqpkit.bench import BenchParams, run_loops
from amqpkit.bench.run import _check_traced

from . import processes
from .test_bench_compare import check_compare_schema


def test_off_noop_batch_in_one_run(amqp_url: str) -> None:
    params = BenchParams(url=amqp_url, scenarios=("rpc", "oneway"), concurrency=(4,), messages=100, warmup=10,
                         otel=("off", "noop", "batch"))  # fmt: skip
    result = run_loops(params)
    doc = result.as_dict()
    check_compare_schema(doc, ["off", "noop", "batch"], repeat=1)
    assert doc["compare"]["by"] == ["otel"]
    assert [arm["otel"] for arm in doc["compare"]["arms"]] == ["off", "noop", "batch"]
    assert all(r["messages"] == 100 and r["errors"] == 0 for a in doc["compare"]["arms"] for r in a["results"])
    assert {(r["arm"], r["scenario"]) for r in doc["compare"]["ratios"]} == {
        (arm, s) for arm in ("noop", "batch") for s in ("rpc", "oneway")
    }
    assert not telemetry.instrumented()


@pytest.mark.usefixtures("spawned")
@pytest.mark.parametrize(("mode", "instrumented"), [("off", False), ("batch", True)])
async def test_the_serving_process_says_whether_it_is_instrumented(
    amqp_url: str, name: str, mode: str, instrumented: bool
) -> None:
    proc = await processes.spawn(
        sys.executable, "-m", "amqpkit.bench.serve", "rpc", "--queue", name, "--otel", mode,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "AMQP_URL": amqp_url},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
    assert ready["ready"] is True
    assert ready["instrumented"] is instrumented
    proc.stdin.write(b"quit\n")
    await proc.stdin.drain()
    assert await asyncio.wait_for(proc.wait(), 30) == 0


def test_a_sender_instrumented_or_not_against_its_mode_stops_the_run() -> None:
    _check_traced("oneway", "batch", 100, 100)
    _check_traced("oneway", "off", 100, 0)
    _check_traced("oneway", None, 100, 7)  # no --otel: not checked
    with pytest.raises(RuntimeError, match="0 of 100 messages carried a traceparent"):
        _check_traced("oneway", "noop", 100, 0)
    with pytest.raises(RuntimeError, match="3 of 100"):
        _check_traced("oneway", "off", 100, 3)
