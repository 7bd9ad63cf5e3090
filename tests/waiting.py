"""Waiting in tests: for a condition, or for a queue to fill (dead-lettering is asynchronous)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from amqpkit import Broker


async def wait_for(predicate: Callable[[], object], timeout: float = 15.0) -> float:
    """Wait until ``predicate()`` is true; returns the seconds it took. AssertionError past ``timeout``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        if loop.time() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
    return loop.time() - started


async def until(check: Callable[[], Awaitable[object]], timeout: float = 15.0, every: float = 0.1) -> float:
    """Wait until ``await check()`` is true (a check that talks to the broker); the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await check():
        if loop.time() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(every)
    return loop.time() - started


async def until_ready(broker: Broker, queue: str, count: int, timeout: float = 10.0) -> None:
    """Wait until ``queue`` holds at least ``count`` ready messages."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (await broker.queue_counts(queue))[0] < count:
        assert loop.time() < end, f"{queue} did not reach {count} messages"
        await asyncio.sleep(0.02)


def hold_the_loop(after: float, seconds: float, task: asyncio.Future[Any], future: asyncio.Future[Any]) -> list[bool]:
    """Block the event loop for ``seconds``, ``after`` seconds from now: the timers falling due meanwhile then run
    in one turn, in the order of their deadlines. The list returned gets, when the hold begins, whether ``task``
    was waiting on ``future`` then (a race at a deadline is only tested if it was)."""
    seen: list[bool] = []

    def hold() -> None:
        seen.append(getattr(task, "_fut_waiter", None) is future)
        time.sleep(seconds)

    asyncio.get_running_loop().call_later(after, hold)
    return seen
