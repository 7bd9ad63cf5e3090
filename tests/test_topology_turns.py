"""A refused topology operation keeps its error to itself (issue 10)."""

from __future__ import annotations

import asyncio

import pytest

from amqpkit import Broker, Queue, TopologyError


async def test_a_refused_declare_does_not_fail_the_others_in_flight(
    broker: Broker, name: str, cleanup: list[str]
) -> None:
    present = [Queue(f"{name}.q{i}") for i in range(20)]
    cleanup += [f"q:{q.name}" for q in present]
    for q in present:
        await broker.declare_queue(q)

    async def missing() -> None:
        with pytest.raises(TopologyError) as info:
            await broker.queue_counts(f"{name}.missing")
        assert f"{name}.missing" in str(info.value)

    results = await asyncio.gather(
        *(broker.queue_counts(q) for q in present[:10]), missing(), *(broker.queue_counts(q) for q in present[10:])
    )
    counts = [r for r in results if r is not None]
    assert counts == [(0, 0)] * 20
