"""patterns._starts.Starts: a stop ends the start under way and those waiting for their turn (broker-free)."""

from __future__ import annotations

import asyncio

from amqpkit.patterns._starts import Starts


async def test_a_stop_ends_the_start_under_way_and_one_waiting_for_its_turn() -> None:
    """A second start queued behind the first ran once the first was overtaken, and the stop waited for it
    (a review: the stop then waited out a whole alarm, and a consumer was attached before it)."""
    starts = Starts()
    broker_answers = asyncio.Event()  # a broker that reads nothing during an alarm
    ran: list[str] = []

    async def start() -> None:
        ran.append("start")
        await broker_answers.wait()

    first = asyncio.ensure_future(starts.start(start))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(starts.start(start))
    await asyncio.sleep(0.05)
    starts.overtake()
    async with starts.turn:
        ran.append("stop")
    assert await asyncio.wait_for(first, 1) is False
    assert await asyncio.wait_for(second, 1) is False
    assert ran == ["start", "stop"]
    broker_answers.set()
    await asyncio.sleep(0.05)
    assert not starts._left  # the overtaken start's clean-up has ended
    # A start after the stop runs.
    assert await asyncio.wait_for(starts.start(start), 1) is True
    assert ran == ["start", "stop", "start"]
