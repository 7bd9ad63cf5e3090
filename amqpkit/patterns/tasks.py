"""What a work-queue task carries and how its outcome is told: header names, the retry policy,
``Retry`` and ``Reject``, task events, idempotency stores.

Shared by :class:`~amqpkit.WorkQueue` (work_queue.py), :class:`~amqpkit.Worker` (worker.py) and the
dead-letter tools (dlq.py).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from ..message import Delivery, as_int
from ..topology import Exchange, ExchangeType

__all__ = [
    "TASK_EVENTS_EXCHANGE",
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "Reject",
    "Retry",
    "RetryPolicy",
    "TaskEvent",
    "TaskStatus",
    "as_int",
    "delay_bucket",
    "describe_dead_letter",
    "now_ms",
]

log = logging.getLogger("amqpkit.worker")


TASK_EVENTS_EXCHANGE = Exchange("amqpkit.tasks", type=ExchangeType.TOPIC)

# Headers a work queue keeps on a task.
ATTEMPT = "x-attempt"
FIRST_FAILURE = "x-first-failure"
LAST_FAILURE = "x-last-failure"
ERROR_TYPE = "x-error-type"
ERROR_MESSAGE = "x-error-message"
ERROR_TRACEBACK = "x-error-traceback"
ORIGINAL_EXCHANGE = "x-original-exchange"
ORIGINAL_ROUTING_KEY = "x-original-routing-key"
DEAD_LETTER_REASON = "x-dead-letter-reason"
ATTEMPTS = "x-attempts"

CONSUMER_TIMEOUT_ARG = "x-consumer-timeout"  # ms; a queue's own consumer timeout
PER_QUEUE_CONSUMER_TIMEOUT = (3, 12)  # the first RabbitMQ version that honours it
TRACEBACK_LIMIT = 4000  # characters kept of a traceback, from its end


class RetryPolicy(BaseModel):
    """Exponential backoff with jitter, capped.

    After attempt n fails the task waits ``initial_delay * multiplier**(n-1)``
    seconds (at most ``max_delay``), give or take ``jitter``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(default=5, ge=1)
    initial_delay: float = Field(default=1.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1)
    max_delay: float = Field(default=300.0, gt=0)
    jitter: float = Field(default=0.1, ge=0, le=1, description="± fraction of the delay drawn at random")

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt ``failed_attempt`` (1-based) failed."""
        return max(0.0, self._base(failed_attempt) * (1 + random.uniform(-self.jitter, self.jitter)))

    def _base(self, failed_attempt: int) -> float:
        if self.initial_delay >= self.max_delay or self.multiplier == 1:
            return min(self.max_delay, self.initial_delay)
        # past this many doublings (or whatever the multiplier) it is max_delay: no float overflow on the way
        steps = math.ceil(math.log(self.max_delay / self.initial_delay, self.multiplier))
        return min(self.max_delay, self.initial_delay * self.multiplier ** min(failed_attempt - 1, steps))

    def delay_buckets(self) -> list[int]:
        """Every delay queue (:func:`delay_bucket`, in ms) a retry by this policy can go to, in order: the
        delays of attempts 1 to ``max_attempts - 1``, give or take ``jitter``."""
        buckets: set[int] = set()
        previous = -1.0
        for failed_attempt in range(1, self.max_attempts):
            base = self._base(failed_attempt)
            if base == previous:
                break  # it no longer grows (max_delay, or a multiplier of 1): the rest are the same
            previous = base
            buckets.update(delay_buckets_between(base * (1 - self.jitter), base * (1 + self.jitter)))
        return sorted(buckets)


class Retry(Exception):
    """Raise in a handler to retry the task after ``delay`` seconds (default: the policy's)."""

    def __init__(self, reason: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class Reject(Exception):
    """Raise in a handler to dead-letter the task at once, with ``reason``."""


class TaskStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    RETRYING = "retrying"
    DEAD_LETTERED = "dead_lettered"
    PROGRESS = "progress"


class TaskEvent(BaseModel):
    """A task's status change, published on ``amqpkit.tasks`` as ``<queue>.<status>``."""

    task_id: str
    queue: str
    status: TaskStatus
    attempt: int
    timestamp: datetime
    error: str | None = None
    retry_in: float | None = None
    progress: float | None = None  # 0 to 1, for status "progress" (see TaskContext)
    note: str | None = None


@runtime_checkable
class IdempotencyStore(Protocol):
    """Remembers the ids of completed tasks, so a redelivered one is not run twice."""

    async def seen(self, task_id: str) -> bool: ...

    async def remember(self, task_id: str) -> None: ...


class MemoryIdempotencyStore:
    """An in-process LRU of the last ``max_size`` completed task ids (per worker process)."""

    def __init__(self, max_size: int = 100_000) -> None:
        self.max_size = max_size
        self._ids: OrderedDict[str, None] = OrderedDict()

    async def seen(self, task_id: str) -> bool:
        if task_id in self._ids:
            self._ids.move_to_end(task_id)
            return True
        return False

    async def remember(self, task_id: str) -> None:
        self._ids[task_id] = None
        self._ids.move_to_end(task_id)
        while len(self._ids) > self.max_size:
            self._ids.popitem(last=False)


def delay_bucket(seconds: float) -> int:
    """Delays rounded to two significant digits (in ms), so a few delay queues serve every delay."""
    ms = max(1, round(seconds * 1000))
    step = 10 ** max(0, len(str(ms)) - 2)
    return max(1, int(round(ms / step) * step))


def delay_buckets_between(low: float, high: float) -> list[int]:
    """Every :func:`delay_bucket` a delay from ``low`` to ``high`` seconds falls into, in order."""
    buckets = []
    ms, last = delay_bucket(max(0.0, low)), delay_bucket(max(0.0, high))
    while ms <= last:
        buckets.append(ms)
        ms += 10 ** max(0, len(str(ms)) - 2)  # the next value with two significant digits
    return buckets


def now_ms() -> int:
    return int(time.time() * 1000)


MAX_ATTEMPT = 2**31 - 1
"""The highest attempt number a task is taken to be on, whatever its ``x-attempt`` says."""


def attempt_of(headers: Mapping[str, Any]) -> int:
    """The attempt a delivery is (its ``x-attempt``, which amqpkit writes on each retry): 1 when it is missing,
    not a whole number or below 1, and at most :data:`MAX_ATTEMPT`. Another client may have written anything
    there: over 64 bits, no copy of the task could carry it (nor attempt + 1) to a retry or the DLQ; below 1,
    it bought the task more attempts than its policy allows."""
    return min(max(as_int(headers.get(ATTEMPT), 1), 1), MAX_ATTEMPT)


def describe_dead_letter(delivery: Delivery[bytes]) -> dict[str, Any]:
    """What ``amqpkit dlq list`` shows of a dead-lettered task."""
    h = delivery.headers
    last = as_int(h.get(LAST_FAILURE), 0)
    death = (h.get("x-death") or [{}])[0] if not last else {}
    return {
        "task_id": delivery.message_id,
        "error": f"{h.get(ERROR_TYPE, death.get('reason', '?'))}: {h.get(ERROR_MESSAGE, '')}".rstrip(": "),
        "reason": h.get(DEAD_LETTER_REASON) or death.get("reason"),
        "attempts": as_int(h.get(ATTEMPTS), as_int(h.get("x-delivery-count"), 0)),
        "age_s": round(time.time() - last / 1000, 1) if last else None,
        "original_routing_key": h.get(ORIGINAL_ROUTING_KEY),
    }
