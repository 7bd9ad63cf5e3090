"""Small asyncio helpers amqpkit's modules share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def first_of(*waits: Awaitable[Any], timeout: float | None = None) -> None:
    """Wait until the first of ``waits`` is done (its outcome is not read), or ``timeout`` seconds (no error), then
    cancel the rest of the coroutines among them; a future or a task passed in is left as it is, for its owner to
    cancel or not (a connection's ``closing``). Cancelled itself, it cancels them too."""
    futures = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future, wait in zip(futures, waits, strict=True):
            if future is not wait:  # a task made here for a coroutine
                future.cancel()
