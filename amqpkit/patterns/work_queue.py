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
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Generic

import aiormq
from aiormq.abc import AbstractChannel
from pamqp.commands import Basic
from typing_extensions import TypeVar  # with a default (PEP 696)

from ..channels import close_quietly
from ..codec import AutoCodec, Codec, encode_body
from ..connection import Broker
from ..errors import PublishError, PublishTimeout, TopologyError, Unroutable, map_exceptions
from ..message import Envelope
from ..topology import DeadLetterStrategy, Overflow, Queue, QueueType
from .tasks import ATTEMPT as ATTEMPT
from .tasks import ATTEMPTS as ATTEMPTS
from .tasks import CONSUMER_TIMEOUT_ARG as CONSUMER_TIMEOUT_ARG
from .tasks import DEAD_LETTER_REASON as DEAD_LETTER_REASON
from .tasks import ERROR_MESSAGE as ERROR_MESSAGE
from .tasks import ERROR_TRACEBACK as ERROR_TRACEBACK
from .tasks import ERROR_TYPE as ERROR_TYPE
from .tasks import FIRST_FAILURE as FIRST_FAILURE
from .tasks import LAST_FAILURE as LAST_FAILURE
from .tasks import ORIGINAL_EXCHANGE as ORIGINAL_EXCHANGE
from .tasks import ORIGINAL_ROUTING_KEY as ORIGINAL_ROUTING_KEY
from .tasks import PER_QUEUE_CONSUMER_TIMEOUT as PER_QUEUE_CONSUMER_TIMEOUT

# Everything a task carries lives in tasks.py; imported from here as before the split.
from .tasks import TASK_EVENTS_EXCHANGE as TASK_EVENTS_EXCHANGE
from .tasks import TRACEBACK_LIMIT as TRACEBACK_LIMIT
from .tasks import IdempotencyStore as IdempotencyStore
from .tasks import MemoryIdempotencyStore as MemoryIdempotencyStore
from .tasks import Reject as Reject
from .tasks import Retry as Retry
from .tasks import RetryPolicy as RetryPolicy
from .tasks import TaskEvent as TaskEvent
from .tasks import TaskStatus as TaskStatus
from .tasks import as_int as as_int
from .tasks import delay_bucket as delay_bucket
from .tasks import describe_dead_letter as describe_dead_letter
from .tasks import now_ms as now_ms
from .worker import Worker as Worker

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

# The names these helpers had before tasks.py held them.
_as_int = as_int
_delay_bucket = delay_bucket

log = logging.getLogger("amqpkit.worker")
ADOPT_LIMIT = 200
"""The most delay queues a worker looks for at start (:meth:`WorkQueue.adopt_delay_queues`)."""

lease_log = log.getChild("lease")  # each delay-queue lease renewal that took a message (DEBUG)

# Any when nothing says (no codec given): `Publisher(broker, x).publish(model)` needs no annotation.
T = TypeVar("T", default=Any)


class _DelayQueueState:
    """What a WorkQueue knows of one of its delay queues: its spec and when its lease was last renewed."""

    __slots__ = ("interval", "renewed", "spec")

    def __init__(self, spec: Queue) -> None:
        self.spec = spec
        self.renewed: float | None = None  # loop time at which the last renewal was sent
        self.interval: float | None = None  # seconds between renewals, once the queue went sooner than its expiry


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

    ``events=True`` publishes each task's status changes on ``amqpkit.tasks``;
    ``event_headers`` names task headers (a request id, a tenant) copied onto
    every event of that task, so whoever watches can tell whose task it is.
    """

    #: A delay queue of ``d`` seconds expires after ``max(delay_queue_min_expiry, 3 * d)`` seconds unused.
    #: Every worker of a queue must use the same value (it is part of the delay queue's declaration).
    delay_queue_min_expiry: float = 60.0
    #: A worker looks, from its start, for the delay queues its retry policy can use that exist, and renews them
    #: (:meth:`adopt_delay_queues`). Each one missing is a NOT_FOUND channel error in the broker's log: 43 lines
    #: at each worker start for the default policy, when none exists. False: it does not look.
    adopt_existing_delay_queues: bool = True

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
        event_headers: Sequence[str] = (),
        consumer_timeout: float | None = None,
    ) -> None:
        if isinstance(event_headers, str):
            raise TypeError("event_headers takes a list of header names, not one string")
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
        self.event_headers = tuple(event_headers)
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
        self._workers: set[object] = set()  # the Workers running on this queue, which renew its delay queues
        self.delay_renewals = 0
        self.delay_queues_vanished = 0  # delay queues found gone before their expiry (see _renew)

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
        :class:`~amqpkit.PublishTimeout` says only that no confirm came in
        time: the broker may have the task, and a worker may run it.
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
                          timestamp=datetime.now(UTC)), confirm=True, task_headers=envelope.headers,
            )  # fmt: skip
        try:
            await self.broker.publish(envelope, routing_key=self.name, mandatory=True, timeout=timeout)
        except PublishError as exc:
            if isinstance(exc, Unroutable):
                self._declared = False
            if self.events:  # the watcher saw "pending": it hears that enqueue failed, and what is known of the task
                # A confirm that did not come in time says nothing of the task: the broker may have it, and run it.
                known = "not confirmed, may still be enqueued" if isinstance(exc, PublishTimeout) else "not enqueued"
                await self.publish_event(
                    TaskEvent(task_id=task_id, queue=self.name, status=TaskStatus.FAILED, attempt=1,
                              timestamp=datetime.now(UTC), error=f"{known}: {type(exc).__name__}: {exc}"),
                    task_headers=envelope.headers,
                )  # fmt: skip
            raise
        return task_id

    async def publish_event(
        self, event: TaskEvent, *, confirm: bool = False, task_headers: Mapping[str, Any] | None = None
    ) -> None:
        """Publish a status change (at most once: events are for watching, not for bookkeeping).

        ``confirm=True`` waits until the broker has routed it, so that what is sent after it on any channel
        reaches a watcher after it. ``task_headers``: the task's headers, of which those named in
        ``event_headers`` go on the event.
        """
        headers = (
            {k: task_headers[k] for k in self.event_headers if k in task_headers}
            if task_headers and self.event_headers
            else {}
        )
        try:
            await self.broker.publish(
                Envelope(event.model_dump_json().encode(), content_type="application/json", message_id=None,
                         persistent=False, headers=headers),
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
        ms = delay_bucket(seconds)
        state = self._delay_queues.get(ms)
        if state is None or renew or self._renewal_due(ms, state):
            await self._renew(ms, force=renew)
        return f"{self.name}.retry.{ms}", ms / 1000

    def delay_queue_renewal_interval(self, ms: int) -> float:
        """Seconds between two renewals of the delay queue of ``ms`` milliseconds (shorter once it went early)."""
        state = self._delay_queues.get(ms)
        if state is not None and state.interval is not None:
            return state.interval
        return self.delay_queue_expiry(ms) * self.delay_queue_renew_fraction

    def delay_queue_check_interval(self) -> float:
        """How often a worker looks for delay queues due a renewal."""
        return min([self.delay_queue_min_expiry / 6] + [s.interval / 2 for s in self._delay_queues.values()
                                                         if s.interval is not None])  # fmt: skip

    def _renewal_due(self, ms: int, state: _DelayQueueState) -> bool:
        if state.renewed is None:
            return True
        age = asyncio.get_running_loop().time() - state.renewed
        return age >= self.delay_queue_renewal_interval(ms)

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
            if state is not None and state.renewed is not None:
                await self._check_still_there(ms, state, sent - state.renewed)
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

    async def _check_still_there(self, ms: int, state: _DelayQueueState, age: float) -> None:
        """Before a renewal: a delay queue gone sooner than its expiry lost what it held; say so, renew it sooner.

        amqpkit cannot see what else shortens a queue's life: an operator
        policy's ``expires`` (on a quorum queue, the policy's wins on RabbitMQ
        3.x, the lower of the two on 4.0 and later), or someone deleting it.
        Either way the retries in it are gone; this is how it shows.
        """
        expiry = self.delay_queue_expiry(ms)
        if age >= expiry:
            return  # it may have expired as declared (a worker stopped renewing it for that long): nothing held
        try:
            await self.broker.queue_counts(state.spec.name)
            return
        except TopologyError as exc:
            if not isinstance(exc.__cause__, aiormq.exceptions.ChannelNotFoundEntity):
                raise
        assert state.renewed is not None  # checked only after a renewal (see _renew)
        age = asyncio.get_running_loop().time() - state.renewed
        if age >= expiry:
            # The answer took that long (a connection the broker blocked reads nothing until it unblocks it):
            # the queue may have expired as declared, with nothing renewing it meanwhile.
            log.info("delay queue %s expired while the broker did not answer (%.1f s since its last renewal, "
                     "expiry %g s); declared again", state.spec.name, age, expiry)  # fmt: skip
            return
        self.delay_queues_vanished += 1
        state.interval = max(0.05, min(self.delay_queue_renewal_interval(ms), age) / 3)
        log.error("delay queue %s was gone %.1f s after its last renewal, before its expiry of %g s: deleted, or "
                  "given a shorter expiry by a policy; retries that were in it are lost. Declared again, and "
                  "renewed every %.2g s from now on", state.spec.name, age, expiry, state.interval)  # fmt: skip

    async def adopt_delay_queues(self, until: asyncio.Event | None = None) -> int:
        """Renew, from now on, the delay queues this queue's retry policy can use that exist but that this
        WorkQueue never sent to (another worker process did, or this one before a restart); how many.

        A delay queue holds a retry past its delay while the work queue refuses it (full under a length
        limit): the broker tries again minutes later. Nothing renewed it once the worker that sent the retry
        stopped, and it expired with the retry. A policy with more than :data:`ADOPT_LIMIT` delay queues
        (a large ``jitter`` over delays that span decades) is not looked through; nor are delays a handler
        chose itself (:class:`Retry` with ``delay``) outside the policy's.

        It stops between two queues once ``until`` is set: cancelled in the middle of a declare, aiormq closes
        the channel while the broker may be closing it over a missing queue, and the broker then closes the
        whole connection (504 CHANNEL_ERROR). A Worker sets it and waits, rather than cancel this.
        """
        if not self.adopt_existing_delay_queues:
            return 0
        buckets = [ms for ms in self.retry.delay_buckets() if ms not in self._delay_queues]
        if len(buckets) > ADOPT_LIMIT:
            log.info("the retry policy of %s can use %d delay queues, more than the %d looked for at start",
                     self.name, len(buckets), ADOPT_LIMIT)  # fmt: skip
            return 0
        found = await self._existing([f"{self.name}.retry.{ms}" for ms in buckets], until)
        for ms in buckets:
            name = f"{self.name}.retry.{ms}"
            if name not in found or (until is not None and until.is_set()):
                continue
            try:
                await self._renew(ms, force=True)
            except TopologyError as exc:
                if "current is 'stream'" in str(exc):
                    # a stream, whose basic.get the broker answers by closing the whole connection: not touched
                    log.warning("queue %s, named as a delay queue of %s, is a stream (%s); left alone",
                                name, self.name, exc)  # fmt: skip
                    found.discard(name)
                    continue
                # declared otherwise (another release, another min expiry): one get
                log.warning("delay queue %s is declared otherwise than this worker would (%s); renewed once, not "
                            "kept renewed", name, exc)  # fmt: skip
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._touch(name), self.broker.settings.publish_timeout)
        if found:
            log.info("%s: renewing %d delay queue(s) that another worker sent retries to", self.name, len(found))
        return len(found)

    async def _existing(self, names: list[str], until: asyncio.Event | None) -> set[str]:
        """Which of the queues ``names`` exist: a passive declare of each, on a channel of this call's own (the
        broker closes it over each one missing, and a cancelled declare closes it too: no other channel of the
        Broker's sees either)."""
        found: set[str] = set()
        channel: AbstractChannel | None = None
        try:
            for name in names:
                if until is not None and until.is_set():
                    break
                if channel is None or channel.is_closed:
                    channel = await self.broker.lowlevel.open_channel()
                try:
                    with map_exceptions(kind="queue", name=name):
                        await channel.queue_declare(name, passive=True)
                except TopologyError as exc:
                    if isinstance(exc.__cause__, aiormq.exceptions.ChannelNotFoundEntity):
                        continue
                    raise
                found.add(name)
        finally:
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()
        return found

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

    def _worker_started(self, worker: object) -> None:
        self._workers.add(worker)

    def _worker_stopped(self, worker: object) -> None:
        """Once the last Worker on this queue stops, nothing renews its delay queues: they expire on the broker as
        declared, so the Broker forgets them (a reconnect declared every one again: 51 quorum queues brought back
        after they had expired, in a hunt), and the channel of the renewals is closed (one was left open per
        WorkQueue whose worker had retried a task: 30 such WorkQueues, 31 channels more)."""
        self._workers.discard(worker)
        if self._workers:
            return
        self.broker.forget(*(state.spec for state in self._delay_queues.values()))
        self._delay_queues.clear()
        channel, self._touch_channel = self._touch_channel, None
        if channel is not None and not channel.is_closed:
            self.broker._spawn(close_quietly(channel))

    async def _touch(self, queue: str) -> None:
        """One basic.get on ``queue``, which counts as use; a message it takes goes straight back.

        It goes back by closing the channel that took it, not by ``basic.reject``: RabbitMQ 3.10 kept a
        rejected retry past its delay, behind the retries after it, until some later event on the queue (a
        test: 0.5-2.0 s late with renewals 1.5 s apart; a hunt: 15 s late on a 20 s delay), and let it out
        on time when its channel closed. On RabbitMQ 4.x either way counts towards the queue's delivery limit.
        """
        channel = self._touch_channel
        if channel is None or channel.is_closed:
            channel = self._touch_channel = await self.broker.lowlevel.open_channel()
        try:
            with map_exceptions(kind="queue", name=queue):
                message = await channel.basic_get(queue, no_ack=False)
            if isinstance(message.delivery, Basic.GetOk):
                self._touch_channel = None
                with contextlib.suppress(Exception):
                    await asyncio.shield(channel.close())
                task_id = message.header.properties.message_id
                lease_log.debug("lease of %s renewed: task %s taken and handed back", queue, task_id)
        except BaseException:
            # Cancelled or failed between the get and the reject, the message may be taken by this channel:
            # closing it gives the message back (kept open, it would hold the message until a reconnect).
            self._touch_channel = None
            with contextlib.suppress(Exception):
                await asyncio.shield(channel.close())
            raise
