"""The order-history service: the read side (CQRS), built from events only.

- A subscriber on ``shop.events`` (``order.created``, ``invoice.created``;
  queue ``shop.history.events``) applies each event to the read model, a table in
  ``history.db``, through the inbox: an event delivered twice (a relay that
  sent it again, a redelivery) is applied once.
- RPC on ``shop.history``: ``orders_of`` (a user's orders, newest first),
  ``entry`` (one order) and ``stats`` (events applied and duplicates
  absorbed by this process).
- ``python -m examples.shop rebuild`` (with this service stopped) drops the
  read model and replays the event log, the ``shop.events.log`` stream,
  from its first offset over AMQP 0-9-1 (``x-stream-offset: first``), through
  the same code: the model comes back the same.

The read model never asks the write side: everything in it came in an event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from amqpkit import Broker, BrokerSettings, Delivery, Envelope
from amqpkit.outbox import Inbox, SqliteStore, open_store
from amqpkit.service import Service, ServiceContext

from .common import (
    EVENT_LOG,
    EVENTS,
    HISTORY_RPC,
    INVOICE_CREATED,
    ORDER_CREATED,
    HistoryEntry,
    HistoryStats,
    declare_event_log,
    sqlite_url,
)
from .correlation import from_message
from .tracing import setup_tracing

log = logging.getLogger("shop.history")

service = Service("history", version="1.0.0", description="The read side: each user's orders, from events.")
setup_tracing(service.name)

CONSUMER = "history"
COLUMNS = "order_id, user, total, items, created_at, invoice, invoiced_at, events"


#: The read model's inbox: made with the handler, bound to history.db when the service opens it.
inbox = Inbox(consumer=CONSUMER)


@dataclass
class HistoryDb:
    store: SqliteStore


async def open_history() -> SqliteStore:
    store = await open_store(sqlite_url("history"))
    assert isinstance(store, SqliteStore)
    async with store.transaction() as tx:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS history (order_id TEXT PRIMARY KEY, user TEXT NOT NULL, total REAL NOT NULL,"
            " items INTEGER NOT NULL, created_at TEXT, invoice TEXT, invoiced_at TEXT, events INTEGER NOT NULL)"
        )
    return store


async def apply(delivery: Delivery[Any], tx: Any) -> None:
    """Apply one event to the read model, inside the inbox's transaction. Order of arrival does not matter."""
    event = json.loads(delivery.body)
    if delivery.routing_key == ORDER_CREATED:
        await tx.execute(
            "INSERT INTO history (order_id, user, total, items, created_at, events) VALUES (?, ?, ?, ?, ?, 1)"
            " ON CONFLICT (order_id) DO UPDATE SET user = excluded.user, total = excluded.total,"
            " items = excluded.items, created_at = excluded.created_at, events = events + 1",
            (event["order_id"], event["user"], event["total"], event["items"], event["created_at"]),
        )
    elif delivery.routing_key == INVOICE_CREATED:
        await tx.execute(
            "INSERT INTO history (order_id, user, total, items, invoice, invoiced_at, events)"
            " VALUES (?, ?, ?, 0, ?, ?, 1)"
            " ON CONFLICT (order_id) DO UPDATE SET invoice = excluded.invoice, invoiced_at = excluded.invoiced_at,"
            " events = events + 1",
            (event["order_id"], event["user"], event["total"], event["number"], event["created_at"]),
        )
    else:
        return
    log.info("%s of order %s applied to the read model", delivery.routing_key, event["order_id"])


@service.resource
async def database(ctx: ServiceContext) -> AsyncIterator[HistoryDb]:
    store = await open_history()
    await declare_event_log(ctx.broker)
    try:
        async with inbox.bind(store):
            yield HistoryDb(store)
    finally:
        await store.close()


@service.subscriber(EVENTS, binding_keys=[ORDER_CREATED, INVOICE_CREATED], queue="shop.history.events")
@from_message
@inbox.handler
async def on_event(event: Delivery[bytes], tx: Any) -> None:
    """An order or invoice event: into the read model, once.

    A locked database is a reason to try again (the inbox gives the delivery
    back to the queue after a second); anything else fails the delivery,
    which the subscriber then drops, and the next rebuild from the log
    applies it.
    """
    await apply(event, tx)


async def read(store: SqliteStore, where: str = "", args: tuple[Any, ...] = ()) -> list[HistoryEntry]:
    async with store.transaction() as tx:
        cursor = await tx.execute(f"SELECT {COLUMNS} FROM history {where} ORDER BY created_at DESC, order_id", args)  # noqa: S608
        rows = await cursor.fetchall()
    names = COLUMNS.split(", ")
    return [HistoryEntry.model_validate(dict(zip(names, row, strict=True))) for row in rows]


@service.rpc(HISTORY_RPC)
@from_message
async def orders_of(request: Delivery[str], db: HistoryDb) -> list[HistoryEntry]:
    """A user's orders, newest first."""
    return await read(db.store, "WHERE user = ?", (request.value,))


@service.rpc(HISTORY_RPC)
@from_message
async def entry(request: Delivery[str], db: HistoryDb) -> HistoryEntry | None:
    """One order, or null if no event about it arrived yet."""
    found = await read(db.store, "WHERE order_id = ?", (request.value,))
    return found[0] if found else None


@service.rpc(HISTORY_RPC)
async def stats(_: int) -> HistoryStats:
    """Events applied and duplicates absorbed by this process's inbox since it started."""
    return HistoryStats(applied=inbox.processed, duplicates=inbox.duplicates)


# ---------------------------------------------------------------------- replay


async def rebuild(broker: Broker, store: SqliteStore, *, timeout: float = 60.0) -> tuple[int, int]:
    """Drop the read model and replay the event log from its first offset; (events applied, duplicates skipped).

    The end of the log is found with a marker: a message of our own, sent to
    the log just before reading (it is the last message when the reading
    starts, so everything before it is replayed). Markers are not events; the
    model ignores them.
    """
    async with store.transaction() as tx:
        await tx.execute("DELETE FROM history")
        await tx.execute(f"DELETE FROM {store.inbox_table} WHERE consumer = ?", (CONSUMER,))  # noqa: S608
    await declare_event_log(broker)
    marker = f"replay-marker-{uuid.uuid4().hex}"
    await broker.publish(Envelope(b"{}", content_type="application/json", message_id=marker), exchange=EVENTS.name,
                         routing_key="replay.marker", mandatory=True)  # fmt: skip
    replayed = Inbox(store, CONSUMER)
    # The broker's consumer runs each delivery in a task of its own; the log is applied in its order, one by one.
    entries: asyncio.Queue[Delivery[bytes]] = asyncio.Queue()

    async def take(delivery: Delivery[bytes]) -> None:
        await entries.put(delivery)

    async def replay() -> None:
        while True:
            delivery = await entries.get()
            if delivery.message_id == marker:
                await delivery.ack()
                return
            if delivery.routing_key in (ORDER_CREATED, INVOICE_CREATED):
                await replayed.process(delivery, apply)
            await delivery.ack()

    consumer = await broker.consume(EVENT_LOG, take, prefetch=100, arguments={"x-stream-offset": "first"})
    try:
        await asyncio.wait_for(replay(), timeout)
    finally:
        await consumer.cancel()
    return replayed.processed, replayed.duplicates


async def rebuild_main() -> int:
    """``python -m examples.shop rebuild``: the read model from the log; prints what it did."""
    store = await open_history()
    try:
        async with Broker(BrokerSettings.from_env()) as broker:
            applied, duplicates = await rebuild(broker, store)
        entries = await read(store)
    finally:
        await store.close()
    print(
        f"replayed {EVENT_LOG.name} from its first offset: {applied} events applied, {duplicates} duplicates "
        f"skipped; {len(entries)} orders in the read model"
    )
    return 0
