"""amqpkit bench --target: the same scenarios against several brokers in one run, with ratios to the first.

The targets here are all the test broker (two names for it, and a "cluster" listing it twice): what is
checked is the shape of the report and that nothing leaks a password, never which broker is faster.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from amqpkit.bench import BenchParams
from amqpkit.bench.compare import parse_target
from amqpkit.bench.results import Arm

from .test_bench import RESULT_KEYS, _cli, check_schema

ARM_KEYS = {"name", "target", "otel", "urls", "broker", "load_avg_at_start", "positions", "results"}
RATIO_KEYS = {"arm", "to", "scenario", "concurrency", "rate", "pairs", "throughput_ratio", "p50_ratio"}


def check_compare_schema(doc: dict[str, Any], names: list[str], repeat: int) -> None:
    """The ``compare`` section (docs/bench/README.md), and today's ``results`` kept for the first arm."""
    check_schema(doc)
    compare = doc["compare"]
    assert set(compare) == {"by", "reference", "arms", "ratios"}
    assert [arm["name"] for arm in compare["arms"]] == names
    assert compare["reference"] == names[0]
    for arm in compare["arms"]:
        assert set(arm) - {"chain"} == ARM_KEYS
        assert arm["broker"]["product"] == "RabbitMQ"
        assert len(arm["load_avg_at_start"]) == repeat
        assert len(arm["positions"]) == repeat
        for result in arm["results"]:
            assert set(result) == RESULT_KEYS
            assert result["throughput_per_s"] > 0
    # Each repeat runs every arm once, the order turned by one each time: no arm always runs first or last.
    by_repeat = list(zip(*(arm["positions"] for arm in compare["arms"]), strict=True))
    assert all(sorted(positions) == list(range(len(names))) for positions in by_repeat)
    assert [positions[0] for positions in by_repeat] == [n % len(names) for n in range(repeat)]
    assert doc["results"] == compare["arms"][0]["results"]  # the reference's runs, in today's shape
    assert sorted({r["run"] for r in doc["results"]}) == list(range(repeat))
    for row in compare["ratios"]:
        assert set(row) == RATIO_KEYS
        assert row["to"] == names[0]
        assert row["pairs"] == repeat
        for key in ("throughput_ratio", "p50_ratio"):
            ratio = row[key]
            assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]


@pytest.mark.usefixtures("spawned")
async def test_two_targets_interleaved_with_ratios_and_no_password(amqp_url: str) -> None:
    code, out, err = await _cli(
        "bench", "--target", "one=@BENCH_ONE", "--target", f"two={amqp_url},{amqp_url}",
        "--scenario", "rpc,oneway", "--concurrency", "2", "--messages", "60", "--warmup", "10", "--repeat", "2",
        "--json", "-",
        env={"BENCH_ONE": amqp_url},
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    check_compare_schema(doc, ["one", "two"], repeat=2)
    assert doc["compare"]["by"] == ["target"]
    assert [t["name"] for t in doc["params"]["targets"]] == ["one", "two"]
    two = doc["compare"]["arms"][1]
    assert len(two["urls"]) == 2 and all("***" in u for u in two["urls"])
    assert {(r["scenario"], r["run"]) for r in two["results"]} == {(s, n) for s in ("rpc", "oneway") for n in (0, 1)}
    assert all(r["messages"] == 60 and r["errors"] == 0 for a in doc["compare"]["arms"] for r in a["results"])
    assert {(r["arm"], r["scenario"]) for r in doc["compare"]["ratios"]} == {("two", "rpc"), ("two", "oneway")}
    # The side-by-side table went to stderr; no password anywhere.
    assert "side by side" in err and "two thr" in err
    assert "guest:guest" not in out + err


@pytest.mark.usefixtures("spawned")
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--target", "amqp://guest:Hidden1@127.0.0.1:5672/"], "--target takes NAME=URL"),
        (["--target", "a=http://guest:Hidden1@127.0.0.1/"], "target a: not an AMQP URL"),
        (["--target", "a=@AMQPKIT_NO_SUCH_VARIABLE"], "not set"),
        (["--target", "a=amqp://127.0.0.1/", "--target", "a=amqp://127.0.0.1/"], "target names must differ"),
        (["--otel", "off,verbose"], "unknown otel mode 'verbose'"),
        (["--otel", "off,noop", "--loop", "asyncio,uvloop"], "one --loop"),
    ],
)
async def test_bad_compare_input_is_one_line_and_exit_2(args: list[str], says: str) -> None:
    code, out, err = await _cli("bench", "--messages", "10", *args, timeout=30)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and says in lines[0]
    assert "Hidden1" not in out + err


def test_targets_and_modes_make_the_arms() -> None:
    assert parse_target("c=amqp://a/, amqp://b/") == ("c", ("amqp://a/", "amqp://b/"))
    params = BenchParams(targets=(("x", ("amqp://a/",)), ("y", ("amqp://b/", "amqp://c/"))), otel=("off", "batch"))
    assert params.arms() == [
        Arm("x/off", "x", ("amqp://a/",), "off"), Arm("x/batch", "x", ("amqp://a/",), "batch"),
        Arm("y/off", "y", ("amqp://b/", "amqp://c/"), "off"), Arm("y/batch", "y", ("amqp://b/", "amqp://c/"), "batch"),
    ]  # fmt: skip
    # A cluster: the driver on its first node, the serving side on its second.
    assert (params.arms()[2].client_url, params.arms()[2].server_url) == ("amqp://b/", "amqp://c/")
    assert len(BenchParams().arms()) == 1
