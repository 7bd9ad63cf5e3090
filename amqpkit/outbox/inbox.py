"""The inbox: a handler's effects and "message X was processed by consumer C" commit together.

At-least-once delivery means a handler can see a message twice (a crash
before the ack, a relay that sent it again). The inbox wraps the handler::

    inbox = Inbox(store, consumer="billing")

    async def charge(order: OrderPaid, tx) -> None:
        await tx.execute("UPDATE accounts SET balance = balance - $1 WHERE id = $2", order.total, order.account)

    Worker(WorkQueue(broker, "billing"), inbox.handler(charge))     # or Subscriber(..., inbox.handler(charge))

For each delivery it opens a transaction, records (consumer, message id),
runs the handler with that transaction and commits; the pattern acks after
that. A message whose id is already recorded is not run again: the wrapper
returns at once and the pattern acks it. For :class:`~amqpkit.RpcServer`
the handler's reply is stored with the record, and a repeated request (same
``x-idempotency-key`` header, else same message id) gets the stored reply.

The wrapper uses only what every pattern gives a handler (the
:class:`~amqpkit.Delivery`), so the patterns need no change.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import typing
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Self

from ..codec import AutoCodec, Codec, codec_for, encode_body
from ..message import Delivery
from .storage import InboxRecord, StorageError, Store

__all__ = ["IDEMPOTENCY_KEY_HEADER", "Inbox", "InboxRecordError", "default_key"]

log = logging.getLogger("amqpkit.inbox")

#: The header a caller sets to make retries of one call one message (new message id, same key), like
#: HTTP's Idempotency-Key. Not ``x-request-id``: services put that on everything one HTTP request
#: causes, for their logs, and two different commands must never be merged into one.
IDEMPOTENCY_KEY_HEADER = "x-idempotency-key"

InboxHandler = Callable[..., Awaitable[Any]]


class InboxRecordError(StorageError):
    """An inbox record says the message was processed, but its stored reply cannot be read (tampered)."""


def default_key(delivery: Delivery[Any]) -> str | None:
    """The id a message is deduplicated by: its ``x-idempotency-key`` header if it has one, else its message id."""
    explicit = delivery.headers.get(IDEMPOTENCY_KEY_HEADER)
    if isinstance(explicit, bytes):
        explicit = explicit.decode("utf-8", "replace")
    if isinstance(explicit, str) and explicit:
        return explicit
    return delivery.message_id or None


class Inbox:
    """Deduplicates deliveries for one consumer, by message id, in the handler's own transaction.

    ``consumer`` names the logical consumer (the service and its handler);
    two consumers of the same message each process it once. Its records (this
    consumer's only: each keeps its own retention) older than ``retention``
    seconds are deleted every ``cleanup_interval`` seconds
    while the inbox runs as a context manager (``async with inbox:``), or by
    :meth:`purge`: a message redelivered after that is processed again, so
    keep it longer than any redelivery can take. ``on_duplicate(id)`` is
    called for each repeat absorbed (for metrics).

    In a :class:`~amqpkit.service.Service` the store is a resource made at
    startup, after the handlers are declared: make the inbox without one and
    bind it in the resource::

        inbox = Inbox(consumer="billing")

        @svc.resource
        async def database(ctx: ServiceContext) -> AsyncIterator[Db]:
            store = await open_store(url)
            async with inbox.bind(store):     # until shutdown; deletes old records meanwhile
                yield Db(store)
            await store.close()

        @svc.worker("billing.charges")
        @inbox.handler
        async def charge(order: OrderPaid, tx: Any, ctx: ServiceContext) -> None: ...
    """

    def __init__(
        self,
        store: Store | None = None,
        consumer: str = "",
        *,
        retention: float = 7 * 24 * 3600.0,
        cleanup_interval: float = 3600.0,
        key: Callable[[Delivery[Any]], str | None] = default_key,
        requeue_delay: float = 1.0,
        requeue_delay_max: float = 60.0,
        on_duplicate: Callable[[str], None] | None = None,
    ) -> None:
        if not consumer:
            raise ValueError("an inbox needs a consumer name")
        self.store = store
        self.consumer = consumer
        self.retention = retention
        self.cleanup_interval = cleanup_interval
        self.key = key
        self.requeue_delay = requeue_delay
        self.requeue_delay_max = requeue_delay_max
        self.on_duplicate = on_duplicate
        self.processed = 0
        self.duplicates = 0
        self.unidentified = 0  # messages without an id: processed without deduplication
        self.requeued = 0  # deliveries given back after a database failure
        self.retried = 0  # tries again of a held delivery after a database failure
        self.purged = 0
        self._cleanup: asyncio.Task[None] | None = None
        self._bound = False  # the store came from bind(), and goes with the context's exit
        self.unbound = 0  # deliveries requeued because no store was bound yet

    def bind(self, store: Store) -> Self:
        """Give the inbox its store, for an inbox made before the store (``Inbox(consumer=...)`` in a service).

        Returns the inbox; as a context manager (``async with inbox.bind(store):``)
        it also deletes old records while it runs and lets the store go on exit.
        A delivery that reaches the handler before a store is bound is requeued.
        """
        if self.store is not None:
            if self.store is not store:
                raise ValueError(f"inbox {self.consumer} is already bound to {self.store.description}")
            return self
        self.store = store
        self._bound = True
        return self

    def _store(self) -> Store:
        store = self.store
        if store is None:
            raise StorageError(f"inbox {self.consumer} has no store yet: call inbox.bind(store) at startup")
        return store

    async def __aenter__(self) -> Self:
        if self._cleanup is None or self._cleanup.done():
            self._cleanup = asyncio.get_running_loop().create_task(self._clean(), name=f"inbox {self.consumer}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._cleanup = self._cleanup, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._bound:
            self.store, self._bound = None, False

    async def _clean(self) -> None:
        while True:
            try:
                if self.store is not None:
                    await self.purge()
            except Exception as exc:
                log.warning("could not delete old inbox records of %s: %s", self.consumer, exc)
            await asyncio.sleep(self.cleanup_interval)

    async def purge(self) -> int:
        """Delete this consumer's records older than its retention; how many. Other consumers' are theirs to delete."""
        purged = await self._store().purge_inbox(self.retention, self.consumer)
        self.purged += purged
        return purged

    def handler(
        self, fn: InboxHandler, *, requeue_on_storage_error: bool | None = None
    ) -> Callable[..., Coroutine[Any, Any, Any]]:
        """``fn(message, tx)`` wrapped for a Worker, Subscriber or RpcServer; a decorator too.

        ``fn``'s first parameter is annotated as for any amqpkit handler (a
        model, ``str``, ``Delivery[X]``...); the pattern decodes with that.
        Its second receives the transaction (the store's connection). Any
        parameters after those are the wrapper's too, passed on by keyword:
        a :class:`~amqpkit.TaskContext`, or in a :class:`~amqpkit.service.Service`
        its resources and :class:`~amqpkit.service.ServiceContext`. What it
        returns is stored when not None, and given again for a repeated
        message (RPC replies).

        The store may be bound later (:meth:`bind`): a delivery that comes
        before it is requeued after ``requeue_delay`` seconds (see
        :meth:`requeue_wait`), with a warning, and never lost.

        When the database fails (a lost connection, a session the server
        ended, a lock, a DBA's ``lock_timeout`` or ``statement_timeout``, a
        read-only standby after a failover), nothing was committed:
        with ``requeue_on_storage_error`` the delivery is held and tried
        again after ``requeue_delay`` seconds (doubled at each delivery of
        the same message), then twice as long each time, as long as the time
        held stays within ``requeue_delay_max``; then it is requeued, and the
        pattern takes it as given back (a Worker does not count or remember
        it as completed, an RpcServer does not answer it yet, a Subscriber
        does not count it handled); without, the error goes to
        the pattern (an RpcServer then replies with it, and the caller may
        send the same request again). By default, an RPC request (one with
        ``reply_to``) gets the error and anything else is requeued.
        """
        wants_delivery, value_type, returns, extra = _read_handler(fn)
        reply_codec: Codec[Any] = AutoCodec() if returns in (Any, None, type(None)) else codec_for(returns)

        async def inbox_handler(delivery: Delivery[Any], **kwargs: Any) -> Any:
            async def call(delivery: Delivery[Any], tx: Any) -> Any:
                return await fn(delivery if wants_delivery else delivery.value, tx, **kwargs)

            if self.store is None:
                self.unbound += 1
                log.warning(
                    "inbox %s has no store yet (inbox.bind(store) not called): message %s requeued in %.2g s",
                    self.consumer, delivery.message_id, self.requeue_wait(delivery),
                )  # fmt: skip
                await self._requeue(delivery)
                return None
            try:
                return await self.process(delivery, call, reply_codec)
            except Exception as exc:
                requeue = requeue_on_storage_error if requeue_on_storage_error is not None else not delivery.reply_to
                store = self.store
                if not requeue or store is None or not store.transient(exc) or delivery.settled is not None:
                    raise
                return await self._again(delivery, call, reply_codec, store, exc)

        message = Delivery[value_type]  # type: ignore[valid-type]
        params = [inspect.Parameter("delivery", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=message)]
        params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in extra]
        inbox_handler.__signature__ = inspect.Signature(params, return_annotation=returns)  # type: ignore[attr-defined]
        inbox_handler.__annotations__ = {
            "delivery": message,
            **{p.name: p.annotation for p in extra if p.annotation is not inspect.Parameter.empty},
            "return": returns,
        }
        inbox_handler.__name__ = inbox_handler.__qualname__ = getattr(fn, "__name__", "inbox_handler")
        inbox_handler.__module__ = getattr(fn, "__module__", inbox_handler.__module__)
        inbox_handler.__doc__ = fn.__doc__
        return inbox_handler

    def requeue_wait(self, delivery: Delivery[Any]) -> float:
        """Seconds before ``delivery`` is first tried again after a database failure (or given back, before a store
        is bound): ``requeue_delay``, doubled at each delivery of the same message,
        up to ``requeue_delay_max``, as far as the queue counts deliveries (a quorum queue's ``x-delivery-count``;
        a classic queue says only that a message was delivered before: 1 s, then 2 s each time).

        Each hand-back counts against a quorum queue's delivery limit (a WorkQueue's 20, RabbitMQ 4.x's default
        20), past which the broker dead-letters the message. Given back every second, the tasks of a Worker were
        dead-lettered after a 20 s database outage (4 of 5, in a hunt, with nothing wrong with them); doubling
        from 1 s up to 60 s, 20 deliveries span about 15 minutes of outage."""
        return float(min(self.requeue_delay_max, self.requeue_delay * 2 ** min(delivery.attempt - 1, 32)))

    async def _again(
        self,
        delivery: Delivery[Any],
        call: Callable[[Delivery[Any], Any], Awaitable[Any]],
        reply_codec: Codec[Any],
        store: Store,
        exc: Exception,
    ) -> Any:
        """The database failed under ``delivery`` and nothing was committed: tried again here, the delivery held,
        after :meth:`requeue_wait` and then twice as long each time, for as long as the time held stays within
        ``requeue_delay_max``; then given back.

        A hand-back counts against a quorum queue's delivery limit, a wait while holding does not. Given back at
        every failure, the messages of a shared Subscriber's quorum queue under an operator's ``delivery-limit`` of
        3 were dropped by the broker after 7 s of outage (20 of 20, in a hunt: the queue has no dead-letter
        exchange); held, each delivery covers 30 to 60 s of it."""
        wait, held = self.requeue_wait(delivery), 0.0
        while held + wait <= self.requeue_delay_max:
            log.warning(
                "inbox %s: database failed for message %s (%s: %s); tried again in %.2g s",
                self.consumer, delivery.message_id, type(exc).__name__, exc, wait,
            )  # fmt: skip
            await asyncio.sleep(wait)
            held += wait
            self.retried += 1
            try:
                return await self.process(delivery, call, reply_codec)
            except Exception as again:
                if not store.transient(again) or delivery.settled is not None:
                    raise
                exc = again
            wait *= 2
        self.requeued += 1
        log.warning(
            "inbox %s: database failed for message %s (%s: %s) for the %.2g s it was held; requeued",
            self.consumer, delivery.message_id, type(exc).__name__, exc, held,
        )  # fmt: skip
        await self._give_back(delivery)
        return None

    async def _requeue(self, delivery: Delivery[Any]) -> None:
        await asyncio.sleep(self.requeue_wait(delivery))
        await self._give_back(delivery)

    async def _give_back(self, delivery: Delivery[Any]) -> None:
        try:
            await delivery.nack(requeue=True)
        except Exception as settle_error:
            # Not given back, and not done either: raised, so that the pattern takes it as a failure (returning,
            # a Worker with idempotency would remember it as done and ack its next delivery unrun).
            log.warning("could not requeue message %s: %s", delivery.message_id, settle_error)
            raise

    async def process(
        self,
        delivery: Delivery[Any],
        call: Callable[[Delivery[Any], Any], Awaitable[Any]],
        reply_codec: Codec[Any] | None = None,
    ) -> Any:
        """Run ``call(delivery, tx)`` once per message id; for a repeat, return the stored reply instead.

        For a Subscriber iterated without a handler::

            async for delivery in subscriber:
                await inbox.process(delivery, apply)
                await delivery.ack()
        """
        store = self._store()
        message_id = self.key(delivery)
        if not message_id:
            self.unidentified += 1
            log.warning("inbox %s: a message without an id cannot be deduplicated; processed as it is", self.consumer)
            async with store.transaction() as tx:
                return await call(delivery, tx)
        codec = reply_codec or AutoCodec()
        async with store.transaction() as tx:
            record = await store.inbox_record(tx, self.consumer, message_id)
            if record is None:
                result = await call(delivery, tx)
                if result is not None:
                    body, content_type = encode_body(codec, result)
                    await store.inbox_reply(tx, self.consumer, message_id, body, content_type)
        if record is not None:
            self.duplicates += 1
            if self.on_duplicate is not None:
                self.on_duplicate(message_id)
            log.info("inbox %s: message %s was processed before; not run again", self.consumer, message_id)
            return self._replay(record, codec, message_id)
        self.processed += 1
        return result

    def _replay(self, record: InboxRecord, codec: Codec[Any], message_id: str) -> Any:
        if record.reply is None:
            return None
        try:
            return codec.decode(bytes(record.reply), record.content_type)
        except Exception as exc:
            raise InboxRecordError(
                f"inbox {self.consumer}: message {message_id} was processed, but its stored reply cannot be read "
                f"({type(exc).__name__}); it is not run again"
            ) from None


def _read_handler(fn: InboxHandler) -> tuple[bool, Any, Any, list[inspect.Parameter]]:
    """(wants the Delivery, the value's type, the return type, the parameters after the two) of ``fn(message, tx)``."""
    call = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__call__
    if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(call):
        raise TypeError(f"inbox handler {getattr(fn, '__qualname__', fn)!r} must be an async function")
    every = list(inspect.signature(fn).parameters.values())
    params = [p for p in every if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) < 2:
        raise TypeError(
            f"inbox handler {getattr(fn, '__qualname__', fn)!r} takes the message and the transaction: "
            "async def handle(message, tx): ..."
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    extra: list[inspect.Parameter] = []
    for p in every:
        if p in params[:2] or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind is p.POSITIONAL_ONLY:
            raise TypeError(
                f"inbox handler {getattr(fn, '__qualname__', fn)!r}: parameter {p.name!r} is positional-only; "
                "what comes after the transaction is passed by keyword"
            )
        extra.append(p.replace(annotation=hints.get(p.name, p.annotation)))
    annotation = hints.get(params[0].name, Any)
    returns = hints.get("return", Any)
    wants_delivery = annotation is Delivery or typing.get_origin(annotation) is Delivery
    if wants_delivery:
        args = typing.get_args(annotation)
        annotation = args[0] if args else bytes
    return wants_delivery, annotation, returns, extra
