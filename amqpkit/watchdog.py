"""The event-loop watchdog: names the code that keeps the loop from running.

While an ``async def`` handler does blocking or CPU-bound work, nothing else
on the loop runs: no other message, no heartbeat. Past two heartbeats the
broker closes the connection, the message goes back to the queue, and the
next worker blocks on it again.

The watchdog is a beat on the loop (a callback every ``interval``) and a
thread that looks at it. When the beat is late by more than ``threshold``
seconds the thread looks at what the loop's thread is running, and finds the
handler in its stack (amqpkit registers every handler it wraps). Each block
gives one warning, naming the handler, the line it was blocked on, and how
long it lasted; past the heartbeat the warning comes at once, with what to
do instead (a plain ``def`` runs in a thread; ``executor="process"`` for
CPU-bound work). The same handler blocking again within a minute is counted
into its next warning rather than logged each time. A connection lost right
after such a block says so (:func:`blocked_note`).

The Broker starts it on connect (``BrokerSettings.loop_block_warning``: the
threshold, by default a quarter of the heartbeat; 0 turns it off). Its cost
is one timer callback per interval on the loop and one thread per loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

__all__ = ["LoopWatchdog", "blocked_note", "handler_name", "register_handler", "watch"]

log = logging.getLogger("amqpkit.watchdog")

REPEAT_AFTER = 60.0  # seconds before the same culprit is warned about again
_HANDLERS: dict[CodeType, str] = {}
# The loop's own machinery: never "where" a block is.
_LOOP_FILES = (os.path.dirname(asyncio.__file__) + os.sep, os.path.abspath(__file__))


def handler_name(fn: Any) -> str:
    """``module:qualname`` of a handler (what ``amqpkit worker`` takes), for log lines."""
    target = _unwrap(fn)
    module = getattr(target, "__module__", None) or "?"
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}:{qualname}"


def register_handler(fn: Any) -> str:
    """Remember ``fn``'s code, so the watchdog can name it when it blocks the loop; returns its name."""
    name = handler_name(fn)
    target = _unwrap(fn)
    code = getattr(target, "__code__", None)
    if code is None:
        code = getattr(inspect.getattr_static(type(target), "__call__", None), "__code__", None)
    if isinstance(code, CodeType):
        _HANDLERS[code] = name
    return name


def _unwrap(fn: Any) -> Any:
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif inspect.ismethod(fn):
            fn = fn.__func__
        elif hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        else:
            return fn


@dataclass
class Block:
    """One stretch of time the loop did not run."""

    started: float  # monotonic
    culprit: str | None = None  # the handler, when one was on the loop's stack
    where: str | None = None  # file:line it was blocked on
    warned: bool = False  # dealt with while it was still blocked (past the heartbeat)
    told: bool = False  # ... and a warning went out then
    ended: float | None = None

    @property
    def duration(self) -> float:
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    def who(self) -> str:
        if self.culprit:
            return f"handler {self.culprit}" + (f" (at {self.where})" if self.where else "")
        if self.where:
            return f"code at {self.where}"
        return "code that did not let go of the interpreter (no handler seen)"


def thread_frame(thread_id: int) -> FrameType | None:
    """The frame thread ``thread_id`` is running, from ``sys._current_frames()`` with the garbage collector held off.

    On CPython 3.11 ``sys._current_frames()`` holds the runtime's head lock while it makes frame objects. One of
    those allocations can start a collection that frees a ``threading.local``, whose deallocation takes the same
    lock: the thread waits for itself holding the GIL, and the whole process stops, beyond any timeout
    (python/cpython#106883; CPython 3.12 holds the collector off there itself). It was seen here: CI's suite
    hung in this thread, in ``local_clear`` under ``_PyThread_CurrentFrames``. A collector someone turned off
    stays off.
    """
    enabled = gc.isenabled()
    if enabled:
        gc.disable()
    try:
        return sys._current_frames().get(thread_id)
    finally:
        if enabled:
            gc.enable()


class LoopWatchdog:
    """Watches one event loop; shared by every Broker on it (see :func:`watch`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread_id = threading.get_ident()
        self.users: dict[int, tuple[float, float]] = {}  # user id -> (threshold, heartbeat)
        self.threshold = 0.0
        self.heartbeat = 0.0
        self.interval = 0.1
        self.blocks = 0
        self.last: Block | None = None
        self._due = time.monotonic()
        self._block: Block | None = None
        self._paused = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._quiet: dict[str, tuple[float, int]] = {}  # culprit -> (last warned, blocks since)
        self._quiet_lock = threading.Lock()

    # ------------------------------------------------------------------ users

    def add(self, user: int, threshold: float, heartbeat: float) -> None:
        self.users[user] = (threshold, heartbeat)
        self._configure()
        if self._thread is None:
            self._stop = threading.Event()
            self._due = time.monotonic() + self.interval
            self._timer = self.loop.call_at(self._loop_time_in(self.interval), self._beat)
            self._thread = threading.Thread(target=self._watch, args=(self._stop,), name="amqpkit-watchdog",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    def remove(self, user: int) -> None:
        self.users.pop(user, None)
        if self.users:
            self._configure()
            return
        self._stop.set()  # the thread ends at its next look (it is a daemon: nothing waits for it)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._thread = None
        with self._lock:
            self._block = None

    def _configure(self) -> None:
        self.threshold = min(t for t, _ in self.users.values())
        beats = [h for _, h in self.users.values() if h > 0]
        self.heartbeat = min(beats) if beats else 0.0
        self.interval = min(0.5, max(0.02, self.threshold / 5))

    def _loop_time_in(self, seconds: float) -> float:
        return self.loop.time() + seconds

    # ------------------------------------------------------------------ on the loop

    def _beat(self) -> None:
        now = time.monotonic()
        late = now - self._due
        with self._lock:
            block, self._block = self._block, None
            if self._paused:  # the loop was stopped, not blocked (run_until_complete between calls)
                self._paused, block, late = False, None, 0.0
            if block is None and late > self.threshold:
                block = Block(started=self._due)  # the thread did not get to see it (the GIL was held)
            if block is not None:
                block.ended = now
                self.last = block
                self.blocks += 1
            # The loop runs again from now: a thread that looks while the warning below is written (a write lets
            # go of the GIL) must not take the old due time for a second block of the same length.
            self._due = now + self.interval
        if block is not None and block.duration > self.threshold:
            self._report_end(block)
        if not self._stop.is_set():
            self._due = time.monotonic() + self.interval
            self._timer = self.loop.call_at(self._loop_time_in(self.interval), self._beat)

    def _report_end(self, block: Block) -> None:
        took = block.duration
        if block.warned:
            level = logging.INFO if block.told else logging.DEBUG
            log.log(level, "event loop ran again after %.1f s blocked by %s", took, block.who())
            return
        allowed, more = self._may_warn(block)
        if not allowed:
            log.debug("event loop blocked for %.1f s by %s", took, block.who())
            return
        advice = _advice(block) if self.heartbeat and took >= self.heartbeat else ""
        log.warning(
            "event loop blocked for %.1f s by %s%s: nothing else ran meanwhile, heartbeats included "
            "(threshold %.2g s, heartbeat %s)%s",
            took, block.who(), more, self.threshold, f"{self.heartbeat:g} s" if self.heartbeat else "off", advice,
        )  # fmt: skip

    # ------------------------------------------------------------------ on the thread

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            if self.loop.is_closed():
                return
            late = time.monotonic() - self._due
            if late <= self.threshold:
                continue
            if not self.loop.is_running():
                self._paused = True
                continue
            with self._lock:
                late = time.monotonic() - self._due
                if late <= self.threshold:  # a beat came between the look and the lock
                    continue
                block = self._block
                if block is None:
                    block = self._block = Block(started=self._due)
                    block.culprit, block.where = self._culprit()
                if block.warned or not self.heartbeat or late < self.heartbeat:
                    continue
                block.warned = True
            allowed, more = self._may_warn(block)
            if not allowed:
                continue
            block.told = True
            log.warning(
                "event loop blocked for %.1f s and counting by %s%s, past the %g s heartbeat: the broker will "
                "close the connection and deliver its messages again%s",
                late, block.who(), more, self.heartbeat, _advice(block),
            )  # fmt: skip

    def _may_warn(self, block: Block) -> tuple[bool, str]:
        """One warning per culprit a minute; the blocks in between are counted into the next one."""
        key = block.culprit or block.where or "?"
        now = time.monotonic()
        with self._quiet_lock:
            last, since = self._quiet.get(key, (-REPEAT_AFTER, 0))
            if now - last < REPEAT_AFTER:
                self._quiet[key] = (last, since + 1)
                return False, ""
            self._quiet[key] = (now, 0)
        return True, f" ({since} more blocks by it since the last warning)" if since else ""

    def _culprit(self) -> tuple[str | None, str | None]:
        """The handler on the loop thread's stack, and the line it is at (else the innermost line of any code)."""
        frame: FrameType | None = thread_frame(self.thread_id)
        innermost: str | None = None
        while frame is not None:
            code = frame.f_code
            name = _HANDLERS.get(code)
            if name is not None:
                return name, _place(frame)
            if innermost is None and not code.co_filename.startswith(_LOOP_FILES):
                innermost = _place(frame)
            frame = frame.f_back
        return None, innermost

    # ------------------------------------------------------------------ for log lines

    def note(self, heartbeat: float) -> str:
        """Why a connection was probably lost, if the loop was just blocked for a heartbeat or more."""
        now = time.monotonic()
        with self._lock:
            block = self._block
            if block is None and now - self._due > self.threshold:
                block = Block(started=self._due)
            if block is None:
                block = self.last
        if block is None:
            return ""
        ended = block.ended if block.ended is not None else now
        if now - ended > max(5.0, 2 * heartbeat) or block.duration < max(heartbeat, self.threshold):
            return ""
        return (
            f" (the event loop was blocked for {block.duration:.1f} s by {block.who()}: "
            "no heartbeat could be sent or read meanwhile)"
        )


def _advice(block: Block) -> str:
    what = block.culprit or "the blocking code"
    return f". Make {what} a plain 'def' (amqpkit runs it in a thread), or pass executor='process' for CPU-bound work"


def _place(frame: FrameType) -> str:
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWatchdog] = weakref.WeakKeyDictionary()
_ids = iter(range(1, sys.maxsize))


def watch(threshold: float, heartbeat: float) -> Callable[[], None]:
    """Watch the running loop (one watchdog per loop, shared); returns the function that stops watching.

    ``threshold`` 0 watches nothing.
    """
    if threshold <= 0:
        return lambda: None
    loop = asyncio.get_running_loop()
    dog = _watchdogs.get(loop)
    if dog is None:
        dog = _watchdogs[loop] = LoopWatchdog(loop)
    user = next(_ids)
    dog.add(user, threshold, heartbeat)
    done = False

    def stop() -> None:
        nonlocal done
        if not done:
            done = True
            dog.remove(user)

    return stop


def blocked_note(heartbeat: float) -> str:
    """Text to add to a 'connection lost' line when a blocked loop is the likely cause (else '')."""
    with contextlib.suppress(RuntimeError):
        dog = _watchdogs.get(asyncio.get_running_loop())
        if dog is not None:
            return dog.note(heartbeat)
    return ""
