"""The Worker: runs a typed handler over a :class:`~amqpkit.WorkQueue`, with retries and dead-lettering.

See :mod:`amqpkit.patterns.work_queue` for the topology and what happens to a failed task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, Self, cast

from typing_extensions import TypeVar  # with a default (PEP 696)

from .. import _hooks
from .._handlers import HandlerInfo, checked_concurrency, inspect_handler
from ..codec import Codec
from ..connection import Consumer
from ..errors import (
    ConnectionLost,
    DecodeError,
    MessageTooLarge,
    PublishNacked,
    TopologyError,
    Unroutable,
    brief,
)
from ..executors import ExecutorKind, ProcessRunner, ThreadRunner
from ..message import Delivery, Settlement
from ..topology import DeadLetterStrategy
from ..unreadable import refusal
from ._starts import Starts
from .long_tasks import ConsumerTimeouts, task_context
from .tasks import (
    ATTEMPT,
    ATTEMPTS,
    DEAD_LETTER_REASON,
    ERROR_MESSAGE,
    ERROR_TRACEBACK,
    ERROR_TYPE,
    FIRST_FAILURE,
    LAST_FAILURE,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    TRACEBACK_LIMIT,
    IdempotencyStore,
    Reject,
    Retry,
    TaskEvent,
    TaskStatus,
    attempt_of,
    now_ms,
)

if TYPE_CHECKING:
    from .work_queue import WorkQueue

__all__ = ["Worker"]

log = logging.getLogger("amqpkit.worker")

# Any when nothing says (no codec given): `Publisher(broker, x).publish(model)` needs no annotation.
T = TypeVar("T", default=Any)


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
        self.concurrency = checked_concurrency(concurrency, "a Worker's")
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
        self._keeper_events = _KeeperEvents()  # the current keeper's: see _keep_delay_queues
        self._stopped = asyncio.Event()
        # start() and stop() take turns, and a stop ends a start under way (see _starts.Starts): a start during a
        # stop's grace kept the keeper the stop then cancelled, and a stop during a start returned before the start
        # attached a consumer that then ran on.
        self._starts = Starts()
        self.completed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.duplicates = 0
        self.forward_failures = 0

    @property
    def runner(self) -> ThreadRunner | ProcessRunner | None:
        """The pool a plain ``def`` handler runs in (threads, or processes with ``executor="process"``);
        None for an ``async def`` handler, which runs on the event loop."""
        return self._handler.runner

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Declare the queues and attach the consumer.

        A stop() called meanwhile ends the start (its declares may wait for a broker that reads nothing from this
        connection during an alarm): start() then returns with the worker stopped, as if the stop came after it.
        """
        await self._starts.start(self._start)

    async def _start(self) -> None:
        if self._consumer is None:
            await self.queue.declare()
            self._stopped.clear()
            self._consumer = await self.broker.consume(
                self.queue.queue, self._timeouts.wrap(self._on_task), prefetch=self.concurrency,
                on_error=self._failed, grace=self.grace,
            )  # fmt: skip
            if self._keeper is None or self._keeper.done() or self._keeper_events.stop.is_set():
                events = self._keeper_events = _KeeperEvents()  # its own: one told to stop may still end
                self._keeper = asyncio.get_running_loop().create_task(
                    self._keep_delay_queues(events), name=f"amqpkit delay queues of {self.queue.name}"
                )
            self.queue._worker_started(self)

    def _failed(self, exc: BaseException) -> None:
        """The queue could not be re-attached: the worker stops, and says so."""
        self._consumer = None
        keeper, self._keeper = self._keeper, None
        self._keeper_events.stop.set()
        if keeper is not None and self._keeper_events.adopted.is_set():
            keeper.cancel()  # else it ends itself once its current declare is answered
        self.queue._worker_stopped(self)
        self._stopped.set()
        if self.on_error is not None:
            self.on_error(exc)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking tasks; wait ``grace`` s for running ones; requeue what still runs; close.

        A stop called while a start runs ends that start (see start()); a start called while a stop runs waits
        for the stop.
        """
        self._starts.overtake()
        async with self._starts.turn:
            await self._stop(grace)

    async def _stop(self, grace: float | None) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.cancel(grace=self.grace if grace is None else grace)
        self._handler.close()  # its thread or process pool
        keeper, self._keeper = self._keeper, None
        events = self._keeper_events
        if keeper is not None:
            events.stop.set()  # not cancelled in the middle of a declare (see WorkQueue.adopt_delay_queues)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(events.adopted.wait()), self.broker.settings.publish_timeout)
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        self.queue._worker_stopped(self)
        self._stopped.set()

    async def _keep_delay_queues(self, events: _KeeperEvents) -> None:
        """Renew the delay queues' leases while the worker runs (a failed renewal is tried again next tick):
        those this worker sends to, and, from its start, those of its retry policy that exist."""
        try:
            while not events.stop.is_set():
                try:
                    await self.queue.adopt_delay_queues(until=events.stop)
                    break
                except ConnectionLost:  # said once, by the Broker: looked for again once it is back, unless stopped
                    back = asyncio.ensure_future(self.broker.wait_connected())
                    stopping = asyncio.ensure_future(events.stop.wait())
                    try:
                        await asyncio.wait((back, stopping), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        back.cancel()
                        stopping.cancel()
                    if back.done() and not back.cancelled() and back.exception() is not None:
                        return  # the Broker was closed: nothing to look for or renew any more
        except Exception as exc:
            log.warning("could not look for the existing delay queues of %s: %s", self.queue.name, exc)
        finally:
            events.adopted.set()
        if events.stop.is_set():
            return
        while True:
            await asyncio.sleep(self.queue.delay_queue_check_interval())
            if self.broker._closing:
                return  # closed under a worker nobody stopped: nothing can be renewed on it any more
            try:
                await self.queue.renew_delay_queues()
            except Exception as exc:
                log.warning("could not renew the delay queues of %s (tried again shortly): %s", self.queue.name, exc)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # ---------------------------------------------------------------- one task

    async def _on_task(self, raw: Delivery[bytes]) -> None:
        task_id = raw.message_id or ""
        attempt = attempt_of(raw.headers)
        try:
            if raw.unreadable:
                raise refusal(raw.unreadable)
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
            await self._event(task_id, TaskStatus.RUNNING, attempt, raw.headers)
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
        if await self._settled_by_handler(raw, attempt):
            return
        if self.idempotency is not None and task_id:
            await self.idempotency.remember(task_id)
        if delivery.settled is None:
            await _quietly(delivery.ack())
        self.completed += 1
        if self.queue.events:
            await self._event(task_id, TaskStatus.COMPLETED, attempt, raw.headers)

    async def _settled_by_handler(self, raw: Delivery[bytes], attempt: int) -> bool:
        """Whether the handler settled the task itself other than with an ack; if so, counted and said as what it
        is, not as completed (nor remembered as done)."""
        if raw.settled is Settlement.REQUEUED:
            # Given back (as the inbox does when its database fails): counted and remembered as done, its next
            # delivery was acked unrun ("already completed") by a Worker with idempotency: 5 of 5 lost after a
            # 3 s outage. It runs again when it comes back.
            return True
        if raw.settled in (Settlement.NACKED, Settlement.REJECTED):
            # Rejected: the broker dead-letters it (the work queue's DLQ, reason rejected).
            self._count_dead_letter("rejected")
            if self.queue.events:
                await self._event(raw.message_id or "", TaskStatus.DEAD_LETTERED, attempt, raw.headers)
            return True
        return False

    async def _retry_or_dead_letter(
        self, raw: Delivery[bytes], attempt: int, exc: BaseException, tb: Any, delay: float | None
    ) -> None:
        task_id = raw.message_id or ""
        policy = self.queue.retry
        if attempt >= policy.max_attempts:
            log.error(
                "task %s failed on attempt %d of %d, dead-lettered: %s",
                task_id, attempt, policy.max_attempts, brief(exc),
            )  # fmt: skip
            await self._dead_letter(raw, attempt, "max-attempts", exc, tb)
            return
        wanted = policy.delay(attempt) if delay is None else max(0.0, delay)
        try:
            queue_name, real_delay = await self.queue.delay_queue(wanted)
        except TopologyError as refused:
            # The broker refused the delay queue itself (a permission, the vhost's max-queues): requeued, the
            # task ran again every requeue_backoff, beyond its retry policy, for as long as the refusal lasted
            # (21 runs in 21 s with max_attempts=3, in a hunt). Kept in the DLQ instead, to be replayed.
            await self._retry_refused(raw, attempt, exc, tb, f"its delay queue for {wanted:.3g} s was refused", refused)
            return
        except Exception as failure:
            await self._hold_then_requeue(raw, f"the delay queue for {wanted:.3g} s", failure)
            return
        headers = self._failure_headers(raw, attempt, exc, tb)
        headers[ATTEMPT] = attempt + 1
        if _hooks.retry is not None:  # amqpkit.telemetry: the attempt's span fails, the copy links to the first
            _hooks.retry(headers, exc)
        log.warning(
            "task %s failed on attempt %d (%s); retry in %.3g s",
            task_id, attempt, brief(exc), real_delay,
        )  # fmt: skip

        async def redeclare() -> None:
            await self.queue.delay_queue(real_delay, renew=True)

        async def copy_refused(nacked: PublishNacked) -> Literal["refused"]:
            # The delay queue refused the copy (full under an operator's reject-publish length limit): requeued,
            # the task ran again every requeue_backoff as the same attempt, past its retry policy, until the
            # work queue's delivery limit (21 runs with max_attempts=3, in a hunt). Kept in the DLQ instead.
            await self._retry_refused(raw, attempt, exc, tb, f"delay queue {queue_name} refused its retry", nacked)
            return "refused"

        moved = await self._forward(raw, queue_name, headers, redeclare, refused=copy_refused)
        if moved == "moved":
            self.retried += 1
            if _hooks.retried is not None:  # amqpkit.telemetry: counted once the copy is stored, not before
                _hooks.retried()
            if self.queue.events:
                await self._event(
                    task_id, TaskStatus.RETRYING, attempt, raw.headers, error=brief(exc), retry_in=real_delay
                )
        elif moved == "rejected" and self.queue.events:
            await self._event(task_id, TaskStatus.DEAD_LETTERED, attempt, raw.headers, error=brief(exc))

    def _count_dead_letter(self, reason: str) -> None:
        """A dead letter stored (or left to the broker to dead-letter): counted here and, instrumented, in the
        ``amqpkit.tasks.dead_lettered`` metric, with ``reason``."""
        self.dead_lettered += 1
        if _hooks.dead_lettered is not None:  # amqpkit.telemetry
            _hooks.dead_lettered(reason)

    async def _retry_refused(
        self, raw: Delivery[bytes], attempt: int, exc: BaseException, tb: Any, what: str, refusal: BaseException
    ) -> None:
        """The broker refused the retry (``what``: its delay queue, or the copy sent there): the task goes to the
        DLQ with reason ``retry-refused``, to be replayed, rather than requeued to run again past its policy."""
        log.error("task %s failed on attempt %d (%s) and %s (%s); dead-lettered instead of retried",
                  raw.message_id or "", attempt, brief(exc), what, refusal)  # fmt: skip
        await self._dead_letter(raw, attempt, "retry-refused", exc, tb)  # which says so, in the events too

    async def _dead_letter(self, raw: Delivery[bytes], attempt: int, reason: str, exc: BaseException, tb: Any) -> None:
        headers = self._failure_headers(raw, attempt, exc, tb)
        headers[DEAD_LETTER_REASON] = reason
        headers[ATTEMPTS] = attempt
        if _hooks.dead_letter is not None:  # amqpkit.telemetry: the attempt's span fails; the copy keeps the trace
            _hooks.dead_letter(headers, reason, exc)

        async def redeclare() -> None:
            await self.broker.declare_queue(self.queue.dlq)

        async def dlq_refused(nacked: PublishNacked) -> Literal["requeued", "rejected"]:
            # The DLQ refused the copy (full under an operator's reject-publish length limit): requeued, the
            # task ran again every requeue_backoff for as long as the DLQ stayed full (6 runs in 6 s). Left to
            # the broker to dead-letter instead, which keeps it until the DLQ takes it.
            return await self._reject_whole(raw, self.queue.dlq_name, nacked)

        moved = await self._forward(raw, self.queue.dlq_name, headers, redeclare, refused=dlq_refused)
        if moved == "moved":
            self._count_dead_letter(reason)
        if moved != "requeued" and self.queue.events:
            await self._event(raw.message_id or "", TaskStatus.DEAD_LETTERED, attempt, raw.headers, error=brief(exc))

    def _failure_headers(self, raw: Delivery[bytes], attempt: int, exc: BaseException, tb: Any) -> dict[str, Any]:
        headers = dict(raw.headers)
        now = now_ms()
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
        return headers

    async def _forward(
        self,
        raw: Delivery[bytes],
        routing_key: str,
        headers: dict[str, Any],
        redeclare: Callable[[], Awaitable[None]],
        *,
        refused: Callable[[PublishNacked], Awaitable[Literal["requeued", "rejected", "refused"]]] | None = None,
    ) -> Literal["moved", "requeued", "rejected", "refused"]:
        """Publish a copy with ``headers`` to our own queue ``routing_key`` (mandatory, confirmed), then ack
        the original ("moved"). A copy no queue took: ``redeclare`` the queue and try once more. A copy the queue
        refused (a nack) goes to ``refused`` when given, which settles the task and says how. Failed otherwise:
        requeue it ("requeued"), or, if no copy of it can ever be sent, reject it to its dead-letter exchange
        ("rejected", see :meth:`_reject_whole`)."""
        copy = raw.forwarded(headers)
        try:
            with self.broker.lowlevel.sending_received(raw.body):  # the broker took it: not refused for its size
                try:
                    await self.broker.publish(copy, routing_key=routing_key, mandatory=True)
                except Unroutable:
                    if routing_key == self.queue.dlq_name:
                        log.error("DLQ %s was missing when task %s was dead-lettered; declared it again. The dead "
                                  "letters that were in it are gone with it: deleted, or removed by an expires "
                                  "policy (a DLQ nobody reads counts as unused)",
                                  routing_key, raw.message_id)  # fmt: skip
                    else:
                        log.warning("queue %s was missing when task %s was sent there; declared it again",
                                    routing_key, raw.message_id)  # fmt: skip
                    await redeclare()
                    await self.broker.publish(copy, routing_key=routing_key, mandatory=True)
        except MessageTooLarge as exc:
            # The broker's own limit, lowered below this task since it took it: no copy of it can ever be sent.
            return await self._reject_whole(raw, routing_key, exc)
        except Exception as exc:
            if refused is not None and isinstance(exc, PublishNacked):
                return await refused(exc)
            # Not safely stored elsewhere: the original goes back to the queue instead.
            await self._hold_then_requeue(raw, routing_key, exc)
            return "requeued"
        await _quietly(raw.ack())
        return "moved"

    async def _reject_whole(
        self, raw: Delivery[bytes], target: str, exc: MessageTooLarge | PublishNacked
    ) -> Literal["requeued", "rejected"]:
        """No copy of the task can be sent (too large), or the DLQ refused it: rejected, so the broker
        dead-letters it as it is to the DLQ, without the worker's error headers. Run again and again, it would
        only be refused again.

        Only where the queue is known to dead-letter to its DLQ and keep what it cannot yet deliver there (a
        WorkQueue's own spec: the default exchange, the DLQ's name, at least once). A spec of the user's own
        might route a rejected task nowhere (it would be dropped) or back to itself (run again at once): the
        task gets back after ``requeue_backoff``, as for any other failed copy."""
        spec = self.queue.queue
        to_dlq = (
            spec.dead_letter_exchange == ""
            and spec.dead_letter_routing_key == self.queue.dlq_name
            and spec.dead_letter_strategy is DeadLetterStrategy.AT_LEAST_ONCE
        )
        if (isinstance(exc, MessageTooLarge) and not exc.by_broker) or not to_dlq:
            await self._hold_then_requeue(raw, target, exc)
            return "requeued"
        self.forward_failures += 1
        self._count_dead_letter("rejected")  # as the DLQ listing reads it (the broker's x-death)
        log.error("could not move task %s to %s (%s); rejected, so the broker dead-letters it as it is, without "
                  "the worker's error headers", raw.message_id, target, exc)  # fmt: skip
        await _quietly(raw.reject(requeue=False))
        return "rejected"

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
        self, task_id: str, status: TaskStatus, attempt: int, task_headers: Mapping[str, Any], *,
        error: str | None = None, retry_in: float | None = None,
    ) -> None:  # fmt: skip
        await self.queue.publish_event(
            TaskEvent(task_id=task_id, queue=self.queue.name, status=status, attempt=attempt,
                      timestamp=datetime.now(UTC), error=error, retry_in=retry_in),
            task_headers=task_headers,
        )  # fmt: skip


class _KeeperEvents:
    """One keeper's: ``stop`` asks its look for existing delay queues to end between two declares (cancelled in
    the middle of one, the connection could be closed: see WorkQueue.adopt_delay_queues); it sets ``adopted``
    once that look has ended."""

    __slots__ = ("adopted", "stop")

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.adopted = asyncio.Event()


async def _quietly(settling: Awaitable[None]) -> None:
    try:
        await settling
    except Exception as exc:
        log.warning("could not settle a task (the broker will deliver it again): %s", exc)
