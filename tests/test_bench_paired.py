"""``amqpkit bench --paired``: at one call in flight the scenarios' calls alternate one by one.

Run against run, a millisecond round trip on a small shared machine moves by more than the
differences the bench is asked to show; alternating call by call, each pair of calls meets the
same machine (patterns/rpc-vs-messaging.md, "What amqpkit costs"). Checked here: the calls do
alternate, every scenario goes first as often, the results keep the JSON's shape, other
concurrency levels run as before, and what cannot be paired is refused. Nothing here checks speed.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from amqpkit.bench import BenchParams, run_bench
from amqpkit.bench.scenarios import CLIENTS

from .test_bench import check_schema


async def test_calls_alternate_one_by_one_at_one_in_flight(amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[tuple[str, bool, int]] = []  # (scenario, warm-up?, calls in flight when it started)
    in_flight = 0
    for name in ("rpc", "raw-rpc"):
        original = CLIENTS[name].operate

        async def operate(self: Any, sent_ns: int, warmup: bool, name: str = name, original: Any = original) -> None:
            nonlocal in_flight
            order.append((name, warmup, in_flight))
            in_flight += 1
            try:
                await original(self, sent_ns, warmup)
            finally:
                in_flight -= 1

        monkeypatch.setattr(CLIENTS[name], "operate", operate)
    params = BenchParams(url=amqp_url, scenarios=("rpc", "raw-rpc"), concurrency=(1, 4), messages=40, warmup=4,
                         inproc=True, paired=True)  # fmt: skip
    result = await run_bench(params)
    check_schema(result.as_dict())
    assert result.as_dict()["params"]["paired"] is True
    by_level = {(r.scenario, r.concurrency): r for r in result.results}
    assert set(by_level) == {("rpc", 1), ("raw-rpc", 1), ("rpc", 4), ("raw-rpc", 4)}
    for name in ("rpc", "raw-rpc"):
        paired = by_level[(name, 1)]
        assert (paired.messages, paired.errors) == (40, 0)
        assert paired.throughput_per_s > 0 and paired.latency_us.p50 > 0
    measured = [(name, depth) for name, warmup, depth in order if not warmup]
    paired_calls = measured[:80]  # c=1 comes first: 40 rounds of one call each
    assert all(depth == 0 for _, depth in paired_calls)
    rounds = [paired_calls[i : i + 2] for i in range(0, 80, 2)]
    assert all(sorted(name for name, _ in r) == ["raw-rpc", "rpc"] for r in rounds), rounds
    firsts = [r[0][0] for r in rounds]
    assert firsts.count("rpc") == firsts.count("raw-rpc") == 20  # neither always goes first
    # c=4 ran as before: one scenario's calls, then the other's, several in flight.
    rest = [name for name, _ in measured[80:]]
    assert rest == ["rpc"] * 40 + ["raw-rpc"] * 40
    assert max(depth for _, depth in measured[80:]) > 0


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"scenarios": ("rpc", "oneway")}, "calls"),
        ({"scenarios": ("rpc", "chain-rpc")}, "calls"),
        ({"concurrency": (8, 64)}, "--concurrency"),
        ({"rate": 100.0}, "--rate"),
        ({"burst": ((100.0, 1.0),)}, "--burst"),
        ({"messages": None, "duration": 5.0}, "--messages"),
    ],
)
def test_what_cannot_be_paired_is_refused_in_one_line(changes: dict[str, Any], says: str) -> None:
    base: dict[str, Any] = {"scenarios": ("rpc", "raw-rpc"), "concurrency": (1,), "messages": 100, "paired": True}
    with pytest.raises(ValidationError) as caught:
        BenchParams(**{**base, **changes})
    message = str(caught.value.errors()[0]["msg"])
    assert "--paired" in message and says in message and "\n" not in message
