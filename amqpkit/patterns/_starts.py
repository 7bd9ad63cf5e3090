"""Starts a stop can overtake: shared by the patterns that consume (Worker, Subscriber, RpcServer)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from .._aio import first_of

log = logging.getLogger("amqpkit.patterns")


class Starts:
    """One start at a time, which a stop ends.

    A start's declares and its basic.consume can wait a long time: during a memory alarm RabbitMQ reads nothing
    from a connection that has published. A stop then must not wait for it (a SIGTERM's stop would wait the
    whole alarm), nor let it attach a consumer afterwards (stopped, the pattern would take messages for good).
    :meth:`run` runs the start; :meth:`overtake`, called by the stop first, cancels it. What the cancelled
    start began is taken down by its own clean-up (consume() drops a consumer it did not finish starting) in
    the background, once the broker answers; the next start waits for that clean-up before its own.
    """

    def __init__(self) -> None:
        self.turn = asyncio.Lock()  # held by run(): starts one at a time
        self._stops = 0  # how many stops have begun: a start waiting for its turn meanwhile does not run
        self._overtaken: asyncio.Event | None = None  # the start under way's; set by overtake()
        self._left: set[asyncio.Future[None]] = set()  # overtaken starts still cleaning up, held until they end

    async def start(self, start: Callable[[], Awaitable[None]]) -> bool:
        """Run ``start()`` when its turn comes, unless a stop begun meanwhile ended it; False when a stop did."""
        stops = self._stops
        async with self.turn:
            if self._stops != stops:  # a stop came while this waited for its turn (behind another start)
                return False
            return await self.run(start)

    async def run(self, start: Callable[[], Awaitable[None]]) -> bool:
        """Run ``start()`` (the caller holds :attr:`turn`, see :meth:`start`); False when a stop overtook it."""
        overtaken = self._overtaken = asyncio.Event()
        try:
            if self._left:  # an earlier overtaken start still cleaning up: after it, unless overtaken too
                await first_of(asyncio.wait(set(self._left)), overtaken.wait())
                if overtaken.is_set():
                    return False
            starting = asyncio.ensure_future(start())
            try:
                await first_of(starting, overtaken.wait())  # the start is a task: first_of leaves it be
            except asyncio.CancelledError:
                starting.cancel()  # cancelled from outside: its clean-up ends before this does, as before
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                raise
        finally:
            self._overtaken = None
        if starting.done():
            starting.result()
            return True
        starting.cancel()
        self._left.add(starting)
        starting.add_done_callback(self._cleaned_up)
        return False

    def overtake(self) -> None:
        """Called by a stop: the start under way, if any, ends now, and those waiting for their turn do not run."""
        self._stops += 1
        if self._overtaken is not None:
            self._overtaken.set()

    def _cleaned_up(self, starting: asyncio.Future[None]) -> None:
        self._left.discard(starting)
        if not starting.cancelled() and (exc := starting.exception()) is not None:
            log.debug("a start overtaken by a stop ended with %s: %s", type(exc).__name__, exc)
