"""Long tasks on a work queue: progress reports, and the broker's delivery timeout.

RabbitMQ gives a consumer ``consumer_timeout`` (30 minutes by default) to
acknowledge a delivery. Past it, the broker closes the consumer's channel
with ``PRECONDITION_FAILED - delivery acknowledgement on channel N timed
out`` and puts every unacknowledged message of that channel back in the
queue. A worker that simply runs the copy again times out again: the task
loops for ever, and never completes.

:class:`ConsumerTimeouts` sits in front of a :class:`~amqpkit.Worker`'s task
callback. When a channel closes for that reason it names the task that was
held (the oldest in flight on the channel: the broker checks only that one)
in one ERROR line, and remembers it. When the broker delivers that task
again (same task id, flagged redelivered):

- if its first run goes on (a plain ``def`` in its thread, or a process:
  those cannot be stopped), the copy waits for it, at most half the timeout,
  and takes its outcome: completed, retried or dead-lettered as usual. The
  handler does not run twice;
- otherwise (an ``async def`` run is cancelled with its channel, or the
  first run is still going after the wait) the copy goes to the DLQ with
  reason ``consumer-timeout``, and is not run again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiormq.exceptions

from ..context import TaskContext
from ..errors import AmqpkitError
from ..message import Delivery

if TYPE_CHECKING:
    from .._handlers import HandlerInfo
    from .worker import Worker

__all__ = ["ConsumerTimeoutExceeded", "ConsumerTimeouts", "task_context"]

log = logging.getLogger("amqpkit.worker")

TaskCallback = Callable[[Delivery[bytes]], Awaitable[None]]
# The worker's dead-lettering: (delivery, attempt, reason, error, traceback).
DeadLetter = Callable[[Delivery[bytes], int, str, BaseException, Any], Awaitable[None]]

DEAD_LETTER_REASON = "consumer-timeout"
REMEMBER = 10_000  # timed-out task ids kept until their copy comes back
_TIMEOUT_TEXT = re.compile(r"delivery acknowledgement on channel \d+ timed out")
_TIMEOUT_VALUE = re.compile(r"Timeout value used: (\d+) ms")


class ConsumerTimeoutExceeded(AmqpkitError):
    """What a task dead-lettered for the broker's ``consumer_timeout`` carries as its error."""


def task_context(worker: Worker[Any], delivery: Delivery[Any]) -> TaskContext:
    """The :class:`TaskContext` a Worker's handler gets: the task, and progress as ``<queue>.progress`` events."""
    from .tasks import TaskEvent, TaskStatus, attempt_of

    queue = worker.queue
    task_id = delivery.message_id or ""
    attempt = attempt_of(delivery.headers)

    async def publish(fraction: float, note: str | None) -> None:
        if queue.events:
            await queue.publish_event(
                TaskEvent(task_id=task_id, queue=queue.name, status=TaskStatus.PROGRESS, attempt=attempt,
                          timestamp=datetime.now(UTC), progress=fraction, note=note),
                task_headers=delivery.headers,
            )  # fmt: skip

    return TaskContext(task_id, queue.name, attempt, publish=publish, loop=asyncio.get_running_loop())


@dataclass(eq=False)
class _Run:
    task_id: str
    started: float = field(default_factory=time.monotonic)


@dataclass
class _TimedOut:
    timeout_ms: int | None
    held_for: float

    @property
    def wait(self) -> float:
        """How long a copy may wait for the first run: half the timeout (the copy's own clock runs too)."""
        return (self.timeout_ms or 60_000) / 2000


class _TimeoutWatch:
    """Notices channels the broker closed for ``consumer_timeout``: which delivery was held (the oldest in flight
    on the channel: the broker checks only that one), remembered until its copy comes back."""

    log = log  # where its lines go: the pattern's logger

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.timed_out = 0  # deliveries the broker took back for consumer_timeout
        # Runs by channel: running ones, and those cut short (kept until their channel's close is seen:
        # aiormq cancels a channel's tasks before the close reaches us).
        self._runs: dict[int, dict[int, _Run]] = {}
        self._remembered: OrderedDict[str, _TimedOut] = OrderedDict()

    def key(self, raw: Delivery[bytes]) -> str:
        """What tells a delivery's copy: its message id (a task's id)."""
        return raw.message_id or ""

    def wrap(self, inner: TaskCallback) -> TaskCallback:
        async def on_task(raw: Delivery[bytes]) -> None:
            key = self.key(raw)
            if key and raw.redelivered and key in self._remembered and await self._copy(raw, key):
                return
            channel = self.broker.lowlevel.channel_of(raw)
            run = _Run(key or "")
            runs = self._watch(channel)
            runs[id(run)] = run
            try:
                await inner(raw)
            except asyncio.CancelledError:
                raise  # kept in `runs` until the channel's close says why
            except BaseException:
                runs.pop(id(run), None)
                raise
            runs.pop(id(run), None)

        # Seen as the inner callback's owner, as a bound method of it would be (amqpkit.telemetry tells an
        # RpcServer's deliveries, which run in SERVER spans, by the consumer callback's __self__).
        on_task.__self__ = getattr(inner, "__self__", None)  # type: ignore[attr-defined]
        return on_task

    # ------------------------------------------------------------------ the broker closed a channel

    def _watch(self, channel: Any) -> dict[int, _Run]:
        runs = self._runs.get(id(channel))
        if runs is not None:
            return runs
        runs = self._runs[id(channel)] = {}
        closing = getattr(channel, "closing", None)
        if closing is not None:
            closing.add_done_callback(lambda fut: self._closed(channel, fut))
        return runs

    def _closed(self, channel: Any, closing: asyncio.Future[Any]) -> None:
        held_runs = self._runs.pop(id(channel), {})
        exc = None if closing.cancelled() else closing.exception()
        text = str(exc) if exc is not None else ""
        if not isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed) or not _TIMEOUT_TEXT.search(text):
            return
        match = _TIMEOUT_VALUE.search(text)
        timeout_ms = int(match.group(1)) if match else None
        runs = sorted(held_runs.values(), key=lambda r: r.started)
        if not runs:
            self._said(None, 0, timeout_ms, 0.0)
            return
        held, others = runs[0], len(runs) - 1
        held_for = time.monotonic() - held.started
        self.timed_out += 1
        if held.task_id:
            self._remembered[held.task_id] = _TimedOut(timeout_ms, held_for)
            self._remembered.move_to_end(held.task_id)
            while len(self._remembered) > REMEMBER:
                self._remembered.popitem(last=False)
        self._said(held, others, timeout_ms, held_for)

    what = "message"  # what a delivery is, in the log: "task", "message", "request"
    advice = "For handlers this long, raise consumer_timeout"

    def _said(self, held: _Run | None, others: int, timeout_ms: int | None, held_for: float) -> None:
        """The one ERROR line for a channel the broker closed for consumer_timeout."""
        queue = self._queue_name()
        if held is None:
            self.log.error("the broker closed a channel consuming %s for consumer_timeout (%s); no %s was in flight "
                           "on it any more", queue, _ms(timeout_ms), self.what)  # fmt: skip
            return
        also = (f" {others} other {self.what}{'s' if others != 1 else ''} in flight on that channel go back to the "
                "queue too." if others else "")  # fmt: skip
        self.log.error(
            "%s %s on %s was held %.1f s, past the broker's consumer_timeout (%s): RabbitMQ closed its channel and "
            "gives it back; %s.%s %s",
            self.what, held.task_id[:80] or "(no id)", queue, held_for, _ms(timeout_ms), self._then(timeout_ms), also,
            self.advice,
        )  # fmt: skip

    def _queue_name(self) -> str:
        raise NotImplementedError

    def _then(self, timeout_ms: int | None) -> str:
        """What happens to the held delivery's run and to its copy."""
        raise NotImplementedError

    async def _copy(self, raw: Delivery[bytes], key: str) -> bool:
        """Handle the copy of a delivery held past the timeout; False: let it run."""
        raise NotImplementedError


class ConsumerTimeouts(_TimeoutWatch):
    """A Worker's :class:`_TimeoutWatch`, which keeps the copies of its tasks from looping."""

    def __init__(self, worker: Worker[Any], handler: HandlerInfo, dead_letter: DeadLetter) -> None:
        super().__init__(worker.broker)
        self.worker = worker
        self.handler = handler  # the worker's handler: where its runs go on, and their orphaned futures
        self.dead_letter = dead_letter  # the worker's way to the DLQ (headers, telemetry, settlement)

    what = "task"
    advice = "For tasks this long, raise consumer_timeout (see patterns/work-queue.md)"

    def _queue_name(self) -> str:
        return self.worker.queue.name

    def _then(self, timeout_ms: int | None) -> str:
        if self.handler.runs_on == "loop":
            return "its run is cancelled, and its copy goes to the DLQ (reason consumer-timeout) instead of running"
        return (f"its run goes on in its {self.handler.runs_on}; the copy the broker delivers next waits up to "
                f"{_TimedOut(timeout_ms, 0).wait:g} s for it instead of running again, else goes to the DLQ (reason "
                "consumer-timeout)")  # fmt: skip

    # ------------------------------------------------------------------ its copy comes back

    async def _copy(self, raw: Delivery[bytes], key: str) -> bool:
        """Handle the copy of a timed-out task; False: let the worker run it (it takes the first run's outcome)."""
        info = self._remembered.pop(key)
        first = self.handler.orphan(key)
        if first is not None:
            if not first.done():
                await _wait(first, info.wait)
            if first.done():
                return False  # the worker adopts the outcome (see HandlerInfo): no second run
            first.add_done_callback(lambda f: _late(key, self.worker.queue.name, f))
        from .tasks import attempt_of

        why = ConsumerTimeoutExceeded(
            f"held {info.held_for:.0f} s, past the broker's consumer_timeout ({_ms(info.timeout_ms)}); "
            "not run again: raise consumer_timeout or split the task, then replay it"
        )
        log.error("task %s delivered again after its consumer_timeout: dead-lettered (reason %s), not run again",
                  key, DEAD_LETTER_REASON)  # fmt: skip
        await self.dead_letter(raw, attempt_of(raw.headers), DEAD_LETTER_REASON, why, None)
        return True


class HandlerTimeouts(_TimeoutWatch):
    """The same for a Subscriber's or an RpcServer's deliveries: the copy of one held past the broker's
    ``consumer_timeout`` is refused (``refuse``: rejected, or answered with the error and acked), not run again.

    Run again, an ``async def`` handler was cancelled with its channel at each timeout and started anew on the
    copy, for as long as the process ran (5 starts in 25 s with a 5 s timeout, in a hunt), and an RPC caller
    waited out its timeout while the method ran over and over. A copy is told by its message id (a request's:
    else its correlation id); one without is run again, as before. The held delivery is remembered by the
    instance that held it: with several consumers on the queue (processes, replicas), a copy the broker gives
    to another one runs there, so a delivery runs at most once per consumer, not for ever."""

    def __init__(
        self,
        broker: Any,
        queue: Callable[[], str],
        what: str,
        refuse: Callable[[Delivery[bytes], str], Awaitable[None]],
        logger: logging.Logger,
    ) -> None:
        super().__init__(broker)
        self.log = logger  # the Subscriber's or the RpcServer's (amqpkit.worker was the Worker's)
        self.queue = queue  # the queue's name, for the log
        self.what = what  # "message", "request"
        self.refuse = refuse

    def key(self, raw: Delivery[bytes]) -> str:
        if self.what == "request":
            return raw.message_id or raw.correlation_id or ""
        return raw.message_id or ""

    def _queue_name(self) -> str:
        return self.queue()

    def _then(self, timeout_ms: int | None) -> str:
        return "its handler's run is cancelled (a def handler's thread runs on), and its copy is refused, not run again"

    async def _copy(self, raw: Delivery[bytes], key: str) -> bool:
        info = self._remembered.pop(key)
        why = (f"held {info.held_for:.0f} s, past the broker's consumer_timeout ({_ms(info.timeout_ms)}); not run "
               "again: raise consumer_timeout")  # fmt: skip
        self.log.error("%s %s on %s delivered again after its consumer_timeout: refused, not run again", self.what,
                       key[:80], self.queue())  # fmt: skip
        await self.refuse(raw, why)
        return True


async def _wait(future: concurrent.futures.Future[Any], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def wake(_: object) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(done.set)

    future.add_done_callback(wake)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except TimeoutError:
        return


def _late(key: str, queue: str, future: concurrent.futures.Future[Any]) -> None:
    outcome = "was cancelled" if future.cancelled() else ("failed" if future.exception() else "completed")
    log.warning("task %s on %s %s after its copy went to the DLQ for consumer_timeout: check before replaying it",
                key, queue, outcome)  # fmt: skip


def _ms(timeout_ms: int | None) -> str:
    return f"{timeout_ms} ms" if timeout_ms is not None else "its value not given"
