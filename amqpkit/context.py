"""What a task handler may ask for besides its message: :class:`TaskContext`.

A handler asks for it by annotation, in any parameter after the message::

    async def render(job: Render, ctx: TaskContext) -> None:
        for i, frame in enumerate(job.frames):
            ...
            await ctx.progress((i + 1) / len(job.frames), f"frame {i + 1}")

    def crunch(job: Crunch, ctx: TaskContext) -> Result:     # a thread, or a pool process
        ...
        ctx.progress_nowait(0.5, "half way")

Progress is published as a :class:`~amqpkit.TaskEvent` with status
``progress`` on ``amqpkit.tasks`` (routing key ``<queue>.progress``) when the
work queue has ``events=True``; without events it is only kept on the
context. Reports are coalesced: while one is being published, newer ones
replace each other and only the latest is sent next, so a handler may report
as often as it likes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["TaskContext"]

ProgressSink = Callable[[float, "str | None"], Awaitable[None]]


class TaskContext:
    """The task a handler is running, and a way to report how far it got.

    ``task_id``, ``queue`` and ``attempt`` (1 for a first delivery) name the
    task. :meth:`progress` (async) and :meth:`progress_nowait` (from any
    thread, or from a pool process) report a fraction between 0 and 1 with an
    optional note. :attr:`fraction` and :attr:`note` hold the latest report.
    """

    __slots__ = ("_flushing", "_lock", "_loop", "_pending", "_publish", "_relay", "attempt", "fraction", "note",
                 "queue", "task_id", "token")  # fmt: skip

    def __init__(
        self,
        task_id: str,
        queue: str,
        attempt: int = 1,
        *,
        publish: ProgressSink | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.task_id = task_id
        self.queue = queue
        self.attempt = attempt
        self.fraction: float | None = None
        self.note: str | None = None
        self.token: int | None = None  # set while the context travels to a pool process
        self._publish = publish
        self._loop = loop
        self._relay: Callable[[int, float | None, str | None], None] | None = None  # in a pool process
        self._pending: tuple[float, str | None] | None = None
        self._flushing: asyncio.Future[None] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<TaskContext {self.queue}:{self.task_id} attempt={self.attempt} progress={self.fraction}>"

    # ------------------------------------------------------------------ reporting

    async def progress(self, fraction: float, note: str | None = None) -> None:
        """Report progress and wait until it was published (at most once: events are for watching)."""
        self._record(fraction, note)
        if self._relay is not None:
            self._relay_latest()
            return
        loop = self._loop
        if loop is None or self._publish is None:
            return
        if _running_loop() is not loop:
            raise RuntimeError("await ctx.progress() on the worker's event loop; from a thread use progress_nowait()")
        await self._schedule()

    def progress_nowait(self, fraction: float, note: str | None = None) -> None:
        """Report progress without waiting: from the event loop, a handler's thread, or a pool process."""
        self._record(fraction, note)
        if self._relay is not None:
            self._relay_latest()
            return
        loop = self._loop
        if loop is None or self._publish is None or loop.is_closed():
            return
        if _running_loop() is loop:
            self._start_flush()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody to tell
                loop.call_soon_threadsafe(self._start_flush)

    def _record(self, fraction: float, note: str | None) -> None:
        value = float(fraction)
        if math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"progress is a fraction from 0 to 1, not {fraction!r}")
        with self._lock:
            self.fraction, self.note = value, note
            self._pending = (value, note)

    def _relay_latest(self) -> None:
        assert self._relay is not None and self.token is not None
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._relay(self.token, *pending)

    async def _schedule(self) -> None:
        self._start_flush()
        flushing = self._flushing
        if flushing is not None:
            await asyncio.shield(flushing)

    def _start_flush(self) -> None:
        if self._flushing is None or self._flushing.done():
            loop = self._loop
            assert loop is not None
            self._flushing = loop.create_task(self._flush())

    async def _flush(self) -> None:
        assert self._publish is not None
        while True:
            with self._lock:
                pending, self._pending = self._pending, None
            if pending is None:
                return
            try:
                await self._publish(*pending)
            except Exception:  # noqa: S112 - progress is for watching; the publisher logs what failed
                continue

    # ------------------------------------------------------------------ to a pool process and back

    def __reduce__(self) -> tuple[Any, ...]:
        if self.token is None:
            raise TypeError("a TaskContext travels to a pool process only through amqpkit's process executor")
        return (_context_in_child, (self.task_id, self.queue, self.attempt, self.token))


# In a pool process: where progress reports go (set by the pool's initializer).
_child_relay: list[Callable[[int, float | None, str | None], None]] = []


def _context_in_child(task_id: str, queue: str, attempt: int, token: int) -> TaskContext:
    ctx = TaskContext(task_id, queue, attempt)
    ctx.token = token
    if _child_relay:
        ctx._relay = _child_relay[0]
    return ctx


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
