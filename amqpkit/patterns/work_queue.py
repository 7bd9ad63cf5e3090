"""Work queues: competing consumers, broker-delayed retries, dead-lettering, graceful shutdown.

Topology of a work queue named ``jobs`` (all declared by amqpkit)::

    producer ──▶ jobs (quorum) ──▶ Worker(s)
                   ▲   │ failed, attempts left: copy + ack
                   │   ▼
                   │ jobs.retry.<ms> (TTL <ms>) ── expires, dead-lettered back ─┘
                   │
                   └── failed for good / Reject / undecodable: copy with the
                       reason in headers, then ack ──▶ jobs.dlq

A failed task is re-published (mandatory, with a publisher confirm, before
the original is acked: nothing is lost in between) to a delay queue whose TTL
hands it back to the work queue when the delay is over; the worker never
sleeps while holding a message. Delay queues are quorum queues with
at-least-once dead-lettering, one per delay step, and expire when unused:
while a worker uses one it renews the queue's lease (see
:meth:`WorkQueue.delay_queue`). A copy that no queue takes is not acked: the
worker declares its own target again and tries once more, else it requeues
the task after a short pause and logs why. After the last
attempt, or at once for :class:`Reject` and undecodable bodies, the task goes
to ``<queue>.dlq`` carrying the error type and message, a trimmed traceback,
the attempts, the first and last failure times and where it was first
published. A task that keeps killing its worker (so is never acked nor
failed) is dead-lettered by the broker itself after ``delivery_limit``
deliveries, again at-least-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, Protocol, Self, cast, runtime_checkable

from aiormq.abc import AbstractChannel
from pamqp.commands import Basic
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypeVar  # with a default (PEP 696)

from .. import _hooks
from .._handlers import HandlerInfo, inspect_handler
from ..codec import AutoCodec, Codec, encode_body
from ..connection import Broker, Consumer
from ..errors import DecodeError, PublishError, Unroutable, map_exceptions
from ..executors import ExecutorKind
from ..message import Delivery, Envelope
from ..topology import DeadLetterStrategy, Exchange, ExchangeType, Overflow, Queue, QueueType
from .long_tasks import ConsumerTimeouts, task_context

__all__ = [
    "TASK_EVENTS_EXCHANGE",
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "Reject",
    "Retry",
    "RetryPolicy",
    "TaskEvent",
    "TaskStatus",
    "WorkQueue",
    "Worker",
]

log = logging.getLogger("amqpkit.worker")

# Any when nothing says (no codec given): `Publisher(broker, x).publish(model)` needs no annotation.
T = TypeVar("T", default=Any)

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
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (failed_attempt - 1))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


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


def _delay_bucket(seconds: float) -> int:
    """Delays rounded to two significant digits (in ms), so a few delay queues serve every delay."""
    ms = max(1, round(seconds * 1000))
    step = 10 ** max(0, len(str(ms)) - 2)
    return max(1, int(round(ms / step) * step))


def _now_ms() -> int:
    return int(time.time() * 1000)


class _DelayQueueState:
    """What a WorkQueue knows of one of its delay queues: its spec and when its lease was last renewed."""

    __slots__ = ("renewed", "spec")

    def __init__(self, spec: Queue) -> None:
        self.spec = spec
        self.renewed: float | None = None  # loop time at which the last renewal was sent


class WorkQueue(Generic[T]):
    """A durable work queue (a quorum queue by default) with its retry and dead-letter queues.

    ``await queue.enqueue(value)`` publishes a task, waits for the confirm and
    returns the task id. ``queue`` gives a spec of your own instead (e.g. the
    classic durable queue of the official tutorial); retries and the DLQ work
    with it too, only the broker-side delivery limit needs the default spec.

    ``consumer_timeout`` (seconds) gives the queue a consumer timeout of its
    own, for tasks that may run longer than the node's ``consumer_timeout``
    (30 minutes by default): the ``x-consumer-timeout`` queue argument, which
    RabbitMQ has from 3.12 on (4.x included). On an older broker the node's
    setting applies, and :meth:`declare` says so in a warning.
    """

    #: A delay queue of ``d`` seconds expires after ``max(delay_queue_min_expiry, 3 * d)`` seconds unused.
    #: Every worker of a queue must use the same value (it is part of the delay queue's declaration).
    delay_queue_min_expiry: float = 60.0
    #: A delay queue's lease is renewed once this fraction of its expiry has passed since the last renewal.
    delay_queue_renew_fraction: float = 1 / 3

    def __init__(
        self,
        broker: Broker,
        name: str,
        codec: Codec[T] | None = None,
        *,
        retry: RetryPolicy | None = None,
        queue: Queue | None = None,
        delivery_limit: int = 20,
        events: bool = False,
        consumer_timeout: float | None = None,
    ) -> None:
        if consumer_timeout is not None and consumer_timeout <= 0:
            raise ValueError(f"consumer_timeout is in seconds and positive, not {consumer_timeout!r}")
        self.consumer_timeout = consumer_timeout
        self.broker = broker
        self.name = name
        self.codec: Codec[T] = codec if codec is not None else AutoCodec()
        self.explicit_codec = codec
        self.retry = retry or RetryPolicy()
        self.dlq_name = f"{name}.dlq"
        self.events = events
        if queue is not None:
            if queue.name != name:
                raise ValueError(f"the queue spec is named {queue.name!r}, not {name!r}")
            self.queue = queue
        else:
            self.queue = Queue(
                name,
                type=QueueType.QUORUM,
                dead_letter_exchange="",
                dead_letter_routing_key=self.dlq_name,
                dead_letter_strategy=DeadLetterStrategy.AT_LEAST_ONCE,
                overflow=Overflow.REJECT_PUBLISH,
                delivery_limit=delivery_limit,
            )
        self.dlq = Queue(self.dlq_name, type=QueueType.QUORUM)
        self._declared = False
        self._delay_queues: dict[int, _DelayQueueState] = {}  # by delay in ms
        self._renewing = asyncio.Lock()
        self._touch_channel: AbstractChannel | None = None  # ours, for the basic.get that renews a lease
        self.delay_renewals = 0

    async def declare(self) -> None:
        if not self._declared:
            if self.consumer_timeout is not None:
                await self._apply_consumer_timeout()
            await self.broker.declare(self.dlq, self.queue)
            if self.events:
                await self.broker.declare_exchange(TASK_EVENTS_EXCHANGE)
            self._declared = True

    async def _apply_consumer_timeout(self) -> None:
        """The queue's own consumer timeout where the broker has it (3.12+); else a warning, once."""
        assert self.consumer_timeout is not None
        await self.broker.connect()
        version = self.broker.server_version
        if version >= PER_QUEUE_CONSUMER_TIMEOUT:
            ms = round(self.consumer_timeout * 1000)
            self.queue = dataclasses.replace(self.queue, arguments={**self.queue.arguments, CONSUMER_TIMEOUT_ARG: ms})
            return
        log.warning(
            "work queue %s: RabbitMQ %s has no per-queue consumer timeout (it came in 3.12), so consumer_timeout=%gs "
            "is not applied and the node's consumer_timeout (rabbitmq.conf, 30 min by default) holds for its tasks",
            self.name, ".".join(map(str, version)) or "(version unknown)", self.consumer_timeout,
        )  # fmt: skip

    async def enqueue(
        self,
        value: T,
        *,
        task_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        priority: int | None = None,
        timeout: float | None = None,
    ) -> str:
        """Publish a task (persistent, mandatory, confirmed); returns its id.

        Raises :class:`~amqpkit.Unroutable` when no queue took the task (the
        work queue was deleted under us): nothing was stored. The next
        ``enqueue`` (or :meth:`declare`) declares the queue again.
        """
        await self.declare()
        body, content_type = encode_body(self.codec, value)
        envelope = Envelope(
            body, content_type=content_type, headers=dict(headers or {}),
            priority=priority, persistent=True, timestamp=datetime.now(UTC),
        )  # fmt: skip
        if task_id is not None:
            envelope.message_id = task_id
        task_id = envelope.message_id or ""
        if self.events:
            # "pending" goes first, confirmed: the worker's "running" is sent on another channel (often another
            # connection), and RabbitMQ orders messages only within one, so a watcher could see a task run
            # before it was pending (it did, for most of 300 tasks) if this were sent after the task.
            await self.publish_event(
                TaskEvent(task_id=task_id, queue=self.name, status=TaskStatus.PENDING, attempt=1,
                          timestamp=datetime.now(UTC)), confirm=True,
            )  # fmt: skip
        try:
            await self.broker.publish(envelope, routing_key=self.name, mandatory=True, timeout=timeout)
        except PublishError as exc:
            if isinstance(exc, Unroutable):
                self._declared = False
            if self.events:  # the watcher saw "pending": it hears that the task never got in
                await self.publish_event(
                    TaskEvent(task_id=task_id, queue=self.name, status=TaskStatus.FAILED, attempt=1,
                              timestamp=datetime.now(UTC), error=f"not enqueued: {type(exc).__name__}: {exc}"),
                )  # fmt: skip
            raise
        return task_id

    async def publish_event(self, event: TaskEvent, *, confirm: bool = False) -> None:
        """Publish a status change (at most once: events are for watching, not for bookkeeping).

        ``confirm=True`` waits until the broker has routed it, so that what is sent after it on any channel
        reaches a watcher after it.
        """
        try:
            await self.broker.publish(
                Envelope(event.model_dump_json().encode(), content_type="application/json", message_id=None,
                         persistent=False),
                exchange=TASK_EVENTS_EXCHANGE, routing_key=f"{self.name}.{event.status.value}", confirm=confirm,
            )  # fmt: skip
        except PublishError as exc:
            log.warning("could not publish task event %s: %s", event.status.value, exc)

    def delay_queue_expiry(self, ms: int) -> float:
        """Seconds a delay queue of ``ms`` milliseconds lives unused (its ``x-expires``)."""
        return max(self.delay_queue_min_expiry, ms / 1000 * 3)

    async def delay_queue(self, seconds: float, *, renew: bool = False) -> tuple[str, float]:
        """The delay queue for ``seconds``; returns its name and its real delay.

        Declared on first use, and its lease renewed before use once
        ``delay_queue_renew_fraction`` of its expiry has passed since the
        last renewal (``renew`` forces both, e.g. after a publish to it came
        back unroutable). A quorum queue on RabbitMQ 3.10 counts as used only
        while it has a consumer or sees a ``basic.get`` — a re-declare does
        not reset its expiry, nor does publishing to it — so the renewal is
        a declare (it brings the queue back if it went) followed by one
        ``basic.get``; a message that get takes is handed straight back
        (its TTL keeps running from when it was queued).

        A message is sent to a delay queue at most a third of the expiry
        after the last renewal, so the queue has at least two thirds of its
        expiry to run — twice the delay, and 40 s at the default — when the
        message's TTL hands it back to the work queue. While a worker runs,
        it also renews every delay queue it has used (see :class:`Worker`).

        A retry whose TTL runs out while the node is down is kept, but may
        come back up to ``dead_letter_worker_publisher_confirm_timeout``
        (180 s by default) after the node is up again: at start-up a quorum
        queue can dead-letter before the node has brought its exchanges back,
        and its dead-letter worker then waits for that timeout before trying
        again (rabbitmq-server #12625). Nothing a client does reaches that
        message meanwhile; patterns/work-queue.md ("Retries across a broker
        restart") gives the node setting that shortens the wait.
        """
        ms = _delay_bucket(seconds)
        state = self._delay_queues.get(ms)
        if state is None or renew or self._renewal_due(ms, state):
            await self._renew(ms, force=renew)
        return f"{self.name}.retry.{ms}", ms / 1000

    def _renewal_due(self, ms: int, state: _DelayQueueState) -> bool:
        if state.renewed is None:
            return True
        age = asyncio.get_running_loop().time() - state.renewed
        return age >= self.delay_queue_expiry(ms) * self.delay_queue_renew_fraction

    def _delay_spec(self, ms: int) -> Queue:
        return Queue(
            f"{self.name}.retry.{ms}", type=QueueType.QUORUM, message_ttl=ms / 1000,
            expires=self.delay_queue_expiry(ms), dead_letter_exchange="", dead_letter_routing_key=self.name,
            dead_letter_strategy=DeadLetterStrategy.AT_LEAST_ONCE,
        )  # fmt: skip

    async def _renew(self, ms: int, *, force: bool = False) -> None:
        """Declare the delay queue of ``ms`` and renew its lease (one at a time; skipped if another just did)."""
        async with self._renewing:
            state = self._delay_queues.get(ms)
            if state is not None and not force and not self._renewal_due(ms, state):
                return
            spec = state.spec if state is not None else self._delay_spec(ms)
            sent = asyncio.get_running_loop().time()  # the lease runs from no earlier than this
            await self.broker.declare_queue(spec)
            if state is None:
                state = self._delay_queues[ms] = _DelayQueueState(spec)
            try:
                await asyncio.wait_for(self._touch(spec.name), self.broker.settings.publish_timeout)
            except Exception as exc:
                # The queue exists (just declared) but its lease may be as old as before: try again next use.
                log.warning("could not renew delay queue %s: %s", spec.name, exc)
                return
            state.renewed = sent
            self.delay_renewals += 1

    async def renew_delay_queues(self) -> None:
        """Renew the lease of every delay queue this WorkQueue has used, where it is due.

        One that fails (logged; tried again next time) does not keep the others from being renewed.
        """
        for ms in list(self._delay_queues):
            state = self._delay_queues[ms]
            if self._renewal_due(ms, state):
                try:
                    await self._renew(ms)
                except Exception as exc:
                    log.warning("could not renew delay queue %s (tried again shortly): %s", state.spec.name, exc)

    async def _touch(self, queue: str) -> None:
        """One basic.get on ``queue``, which counts as use; a message it takes goes straight back."""
        channel = self._touch_channel
        if channel is None or channel.is_closed:
            channel = self._touch_channel = await self.broker.lowlevel.open_channel()
        with map_exceptions(kind="queue", name=queue):
            message = await channel.basic_get(queue, no_ack=False)
            if isinstance(message.delivery, Basic.GetOk):
                await channel.basic_reject(message.delivery.delivery_tag or 0, requeue=True)


class Worker(Generic[T]):
    """Runs a typed handler over a :class:`WorkQueue` with ``concurrency`` tasks in flight.

    ::

        async def resize(job: ResizeJob) -> None: ...

        async with Worker(WorkQueue(broker, "images"), resize, concurrency=8):
            await stop.wait()

    A task is acked after its handler returns. On failure it is retried after
    the policy's delay (``Retry(delay=...)`` chooses the delay), and after the
    last attempt, or at once on ``Reject`` or a body that does not decode,
    it is dead-lettered with the reason. :meth:`stop` stops taking tasks at
    once, lets running ones finish within ``grace`` seconds, and requeues
    the rest.

    Where the handler runs: an ``async def`` on the event loop; a plain
    ``def`` in a pool of ``concurrency`` threads (blocking code never stops
    the loop and its heartbeats); with ``executor="process"`` in
    ``processes`` processes, for CPU-bound work (see
    :mod:`amqpkit.executors`). A parameter annotated
    :class:`~amqpkit.TaskContext` reports progress. A task held past the
    broker's ``consumer_timeout`` is named and never loops (see
    :mod:`amqpkit.patterns.long_tasks`).

    The copy to the delay queue or the DLQ is published mandatory and
    confirmed before the original is acked. If no queue takes it, the worker
    declares that queue again (both are its own) and tries once more; if the
    copy still fails, the task is requeued after ``requeue_backoff`` seconds
    (a target that stays broken is not hammered; after ``delivery_limit``
    deliveries the broker dead-letters the task itself) and the failure is
    logged and counted in ``forward_failures``.

    While it runs, the worker renews the lease of every delay queue it has
    used (every sixth of the shortest expiry it checks which are due), so a
    delay queue is never removed while a worker that sends to it runs, even
    if a message stays in it past its TTL because the work queue cannot take
    it back yet. Once every such worker has stopped, it expires.
    """

    #: Seconds a task whose copy could not be stored is held before it is requeued.
    requeue_backoff: float = 1.0

    def __init__(
        self,
        queue: WorkQueue[Any],
        handler: Callable[..., Any],
        *,
        concurrency: int = 16,
        codec: Codec[Any] | None = None,
        idempotency: IdempotencyStore | None = None,
        grace: float = 30.0,
        on_error: Callable[[BaseException], None] | None = None,
        executor: ExecutorKind | None = None,
        processes: int | None = None,
    ) -> None:
        self.queue = queue
        self.broker = queue.broker
        self.concurrency = concurrency
        self.grace = grace
        self.idempotency = idempotency
        self.on_error = on_error
        # The codec: given here, else given to the queue, else read from the handler's annotation.
        # A plain def runs in `concurrency` threads; executor="process" in `processes` processes.
        self._handler: HandlerInfo = inspect_handler(
            handler, codec or queue.explicit_codec, concurrency=concurrency, executor=executor,
            processes=processes, context=lambda delivery: task_context(self, delivery),
        )  # fmt: skip
        self._timeouts = ConsumerTimeouts(self, self._handler, self._dead_letter)
        self._consumer: Consumer | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.completed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.duplicates = 0
        self.forward_failures = 0

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._consumer is None:
            await self.queue.declare()
            self._stopped.clear()
            self._consumer = await self.broker.consume(
                self.queue.queue, self._timeouts.wrap(self._on_task), prefetch=self.concurrency,
                on_error=self._failed,
            )  # fmt: skip
            if self._keeper is None or self._keeper.done():
                self._keeper = asyncio.get_running_loop().create_task(
                    self._keep_delay_queues(), name=f"amqpkit delay queues of {self.queue.name}"
                )

    def _failed(self, exc: BaseException) -> None:
        """The queue could not be re-attached: the worker stops, and says so."""
        self._consumer = None
        if self._keeper is not None:
            self._keeper.cancel()
        self._stopped.set()
        if self.on_error is not None:
            self.on_error(exc)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking tasks; wait ``grace`` s for running ones; requeue what still runs; close."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.cancel(grace=self.grace if grace is None else grace)
        self._handler.close()  # its thread or process pool
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        self._stopped.set()

    async def _keep_delay_queues(self) -> None:
        """Renew the delay queues' leases while the worker runs (a failed renewal is tried again next tick)."""
        while True:
            await asyncio.sleep(self.queue.delay_queue_min_expiry / 6)
            try:
                await self.queue.renew_delay_queues()
            except Exception as exc:
                log.warning("could not renew the delay queues of %s (tried again shortly): %s", self.queue.name, exc)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # ---------------------------------------------------------------- one task

    async def _on_task(self, raw: Delivery[bytes]) -> None:
        task_id = raw.message_id or ""
        attempt = _as_int(raw.headers.get(ATTEMPT), 1)
        try:
            value = self._handler.codec.decode(raw.body, raw.content_type)
        except DecodeError as exc:
            log.error("task %s on %s cannot be decoded, dead-lettered: %s", task_id, self.queue.name, exc)
            await self._dead_letter(raw, attempt, "decode-error", exc, None)
            return
        if self.idempotency is not None and task_id and await self.idempotency.seen(task_id):
            self.duplicates += 1
            log.info("task %s already completed; acked without running it again", task_id)
            await raw.ack()
            return
        delivery = cast("Delivery[Any]", raw)
        delivery.value = value
        if self.queue.events:
            await self._event(task_id, TaskStatus.RUNNING, attempt)
        try:
            await self._handler(delivery)
        except asyncio.CancelledError:
            # Shutdown ran out of grace: give the task back, untouched.
            if delivery.settled is None:
                await _quietly(delivery.nack(requeue=True))
            raise
        except Reject as exc:
            log.warning("task %s rejected by its handler: %s", task_id, exc)
            await self._dead_letter(raw, attempt, "rejected", exc, exc.__traceback__)
            return
        except Retry as exc:
            await self._retry_or_dead_letter(raw, attempt, exc, exc.__traceback__, exc.delay)
            return
        except Exception as exc:
            await self._retry_or_dead_letter(raw, attempt, exc, exc.__traceback__, None)
            return
        if self.idempotency is not None and task_id:
            await self.idempotency.remember(task_id)
        if delivery.settled is None:
            await _quietly(delivery.ack())
        self.completed += 1
        if self.queue.events:
            await self._event(task_id, TaskStatus.COMPLETED, attempt)

    async def _retry_or_dead_letter(
        self, raw: Delivery[bytes], attempt: int, exc: BaseException, tb: Any, delay: float | None
    ) -> None:
        task_id = raw.message_id or ""
        policy = self.queue.retry
        if attempt >= policy.max_attempts:
            log.error(
                "task %s failed on attempt %d of %d, dead-lettered: %s: %s",
                task_id, attempt, policy.max_attempts, type(exc).__name__, exc,
            )  # fmt: skip
            await self._dead_letter(raw, attempt, "max-attempts", exc, tb)
            return
        wanted = policy.delay(attempt) if delay is None else max(0.0, delay)
        try:
            queue_name, real_delay = await self.queue.delay_queue(wanted)
        except Exception as failure:
            await self._hold_then_requeue(raw, f"the delay queue for {wanted:.3g} s", failure)
            return
        headers = self._failure_headers(raw, attempt, exc, tb)
        headers[ATTEMPT] = attempt + 1
        if _hooks.retry is not None:  # amqpkit.telemetry: the attempt's span fails, the copy links to the first
            _hooks.retry(headers, exc)
        log.warning(
            "task %s failed on attempt %d (%s: %s); retry in %.3g s",
            task_id, attempt, type(exc).__name__, exc, real_delay,
        )  # fmt: skip

        async def redeclare() -> None:
            await self.queue.delay_queue(real_delay, renew=True)

        if await self._forward(raw, queue_name, headers, redeclare):
            self.retried += 1
            if self.queue.events:
                await self._event(task_id, TaskStatus.RETRYING, attempt, error=_error_text(exc), retry_in=real_delay)

    async def _dead_letter(self, raw: Delivery[bytes], attempt: int, reason: str, exc: BaseException, tb: Any) -> None:
        headers = self._failure_headers(raw, attempt, exc, tb)
        headers[DEAD_LETTER_REASON] = reason
        headers[ATTEMPTS] = attempt
        if _hooks.dead_letter is not None:  # amqpkit.telemetry: the attempt's span fails; the copy keeps the trace
            _hooks.dead_letter(headers, reason, exc)

        async def redeclare() -> None:
            await self.broker.declare_queue(self.queue.dlq)

        if await self._forward(raw, self.queue.dlq_name, headers, redeclare):
            self.dead_lettered += 1
            if self.queue.events:
                await self._event(raw.message_id or "", TaskStatus.DEAD_LETTERED, attempt, error=_error_text(exc))

    def _failure_headers(self, raw: Delivery[bytes], attempt: int, exc: BaseException, tb: Any) -> dict[str, Any]:
        headers = dict(raw.headers)
        now = _now_ms()
        headers.setdefault(FIRST_FAILURE, now)
        headers[LAST_FAILURE] = now
        headers.setdefault(ORIGINAL_EXCHANGE, raw.exchange)
        headers.setdefault(ORIGINAL_ROUTING_KEY, raw.routing_key)
        headers[ERROR_TYPE] = type(exc).__name__
        headers[ERROR_MESSAGE] = str(exc)[:1000]
        text = "".join(traceback.format_exception(type(exc), exc, tb)) if tb is not None else ""
        headers[ERROR_TRACEBACK] = text[-TRACEBACK_LIMIT:]
        headers[ATTEMPT] = attempt
        headers.pop("x-death", None)  # the broker's history of the delay queues, not of the task
        headers.pop("x-delivery-count", None)
        return headers

    async def _forward(
        self, raw: Delivery[bytes], routing_key: str, headers: dict[str, Any], redeclare: Callable[[], Awaitable[None]]
    ) -> bool:
        """Publish a copy with ``headers`` to our own queue ``routing_key`` (mandatory, confirmed), then ack
        the original. A copy no queue took: ``redeclare`` the queue and try once more. Failed: requeue it."""
        copy = raw.forwarded(headers)
        try:
            try:
                await self.broker.publish(copy, routing_key=routing_key, mandatory=True)
            except Unroutable:
                log.warning("queue %s was missing when task %s was sent there; declared it again",
                            routing_key, raw.message_id)  # fmt: skip
                await redeclare()
                await self.broker.publish(copy, routing_key=routing_key, mandatory=True)
        except Exception as exc:
            # Not safely stored elsewhere: the original goes back to the queue instead.
            await self._hold_then_requeue(raw, routing_key, exc)
            return False
        await _quietly(raw.ack())
        return True

    async def _hold_then_requeue(self, raw: Delivery[bytes], target: str, exc: BaseException) -> None:
        """The task could not be moved to ``target``: log it, and requeue it after ``requeue_backoff``."""
        self.forward_failures += 1
        log.error("could not move task %s to %s (%s: %s); requeued in %.3g s",
                  raw.message_id, target, type(exc).__name__, exc, self.requeue_backoff)  # fmt: skip
        try:
            await asyncio.sleep(self.requeue_backoff)
        finally:
            await _quietly(raw.nack(requeue=True))

    async def _event(
        self, task_id: str, status: TaskStatus, attempt: int, *, error: str | None = None, retry_in: float | None = None
    ) -> None:
        await self.queue.publish_event(
            TaskEvent(task_id=task_id, queue=self.queue.name, status=status, attempt=attempt,
                      timestamp=datetime.now(UTC), error=error, retry_in=retry_in)
        )  # fmt: skip


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def as_int(value: Any, default: int) -> int:
    """A header's value as an int, ``default`` when it is missing or not a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


_as_int = as_int


async def _quietly(settling: Awaitable[None]) -> None:
    try:
        await settling
    except Exception as exc:
        log.warning("could not settle a task (the broker will deliver it again): %s", exc)


def describe_dead_letter(delivery: Delivery[bytes]) -> dict[str, Any]:
    """What ``amqpkit dlq list`` shows of a dead-lettered task."""
    h = delivery.headers
    last = _as_int(h.get(LAST_FAILURE), 0)
    death = (h.get("x-death") or [{}])[0] if not last else {}
    return {
        "task_id": delivery.message_id,
        "error": f"{h.get(ERROR_TYPE, death.get('reason', '?'))}: {h.get(ERROR_MESSAGE, '')}".rstrip(": "),
        "reason": h.get(DEAD_LETTER_REASON) or death.get("reason"),
        "attempts": _as_int(h.get(ATTEMPTS), _as_int(h.get("x-delivery-count"), 0)),
        "age_s": round(time.time() - last / 1000, 1) if last else None,
        "original_routing_key": h.get(ORIGINAL_ROUTING_KEY),
    }
