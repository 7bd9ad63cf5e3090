"""amqpkit._aio.first_of: the first of several waits, the others cancelled."""

from __future__ import annotations

import asyncio

import pytest

from amqpkit._aio import first_of


class Waits:
    """Sleeps that note which started and which were cancelled."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []

    async def sleep(self, name: str, seconds: float) -> None:
        self.started.append(name)
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise


async def test_the_first_wait_ends_it_and_the_other_coroutines_are_cancelled() -> None:
    waits = Waits()
    await asyncio.wait_for(first_of(waits.sleep("quick", 0.01), waits.sleep("slow", 60)), 5)
    await asyncio.sleep(0)  # the cancel reaches the slow one
    assert waits.started == ["quick", "slow"] and waits.cancelled == ["slow"]


async def test_a_future_passed_in_is_left_to_its_owner() -> None:
    loop = asyncio.get_running_loop()
    closing: asyncio.Future[None] = loop.create_future()
    event = asyncio.Event()
    loop.call_later(0.01, event.set)
    await asyncio.wait_for(first_of(event.wait(), closing), 5)
    assert not closing.done()
    loop.call_later(0.01, closing.set_result, None)
    await asyncio.wait_for(first_of(asyncio.Event().wait(), closing), 5)
    assert closing.done() and not closing.cancelled()


async def test_cancelled_itself_it_cancels_the_waits_it_made() -> None:
    waits = Waits()
    waiting = asyncio.ensure_future(first_of(waits.sleep("one", 60), waits.sleep("two", 60)))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0)
    assert waits.cancelled == ["one", "two"]


async def test_past_its_timeout_it_returns_and_cancels_them() -> None:
    waits = Waits()
    await asyncio.wait_for(first_of(waits.sleep("one", 60), waits.sleep("two", 60), timeout=0.01), 5)
    await asyncio.sleep(0)
    assert waits.cancelled == ["one", "two"]
