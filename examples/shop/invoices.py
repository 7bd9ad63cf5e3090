"""The invoices service: invoice-write (RPC) and the invoice-manager (a worker).

- **invoice-write**, RPC ``create`` on ``shop.invoices``: the order-manager
  calls it synchronously; it puts a ``CreateInvoice`` command on the
  ``shop.create-invoice`` work queue (task id ``invoice-<order>``) and
  answers once the broker has it. ``for_order`` answers an order's invoice.
- **invoice-manager**, the worker: writes the invoice and its
  ``InvoiceCreated`` event in one transaction (the outbox), the task
  recorded in the inbox in that same transaction: a task delivered again, or
  sent again by a retried order-manager (same task id), writes nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from amqpkit import Delivery
from amqpkit.outbox import Inbox, Outbox, Relay, SqliteStore, open_store
from amqpkit.service import Service, ServiceContext

from . import correlation
from .common import (
    CREATE_INVOICE_QUEUE,
    EVENTS,
    INVOICE_CREATED,
    INVOICES_RPC,
    CreateInvoice,
    Invoice,
    InvoiceAccepted,
    InvoiceCreated,
    declare_event_log,
    event_id,
    sqlite_url,
)
from .correlation import from_message
from .tracing import setup_tracing

log = logging.getLogger("shop.invoices")

service = Service("invoices", version="1.0.0", description="Invoice-write and the invoice-manager.")
setup_tracing(service.name)


#: The invoice-manager's inbox: made with the handler, bound to invoices.db when the service opens it.
inbox = Inbox(consumer="invoice-manager")


@dataclass
class InvoicesDb:
    store: SqliteStore
    outbox: Outbox


@service.resource
async def database(ctx: ServiceContext) -> AsyncIterator[InvoicesDb]:
    """invoices.db: the invoices, the outbox and the inbox; its relay runs while the service does."""
    store = await open_store(sqlite_url("invoices"))
    assert isinstance(store, SqliteStore)
    async with store.transaction() as tx:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS invoices (number TEXT PRIMARY KEY, order_id TEXT NOT NULL UNIQUE,"
            " user TEXT NOT NULL, total REAL NOT NULL, created_at TEXT NOT NULL)"
        )
    await declare_event_log(ctx.broker)
    try:
        async with Relay(store, ctx.broker, poll_interval=0.5), inbox.bind(store):
            yield InvoicesDb(store, Outbox(store))
    finally:
        await store.close()


@service.rpc(INVOICES_RPC)
@from_message
async def create(request: Delivery[CreateInvoice], ctx: ServiceContext) -> InvoiceAccepted:
    """invoice-write: queue the invoice task of an order; answered once the broker has it."""
    command = request.value
    if command.total < 0:
        raise ValueError("an invoice cannot be negative")
    task_id = await ctx.work_queue(CREATE_INVOICE_QUEUE).enqueue(
        command, task_id=f"invoice-{command.order_id}", headers=correlation.headers()
    )
    log.info("invoice task %s queued for order %s", task_id, command.order_id)
    return InvoiceAccepted(task_id=task_id)


@service.rpc(INVOICES_RPC)
@from_message
async def for_order(request: Delivery[str], db: InvoicesDb) -> Invoice | None:
    """The invoice of an order, or null while it has none."""
    order_id = request.value
    async with db.store.transaction() as tx:
        cursor = await tx.execute(
            "SELECT number, order_id, user, total, created_at FROM invoices WHERE order_id = ?", (order_id,)
        )
        row = await cursor.fetchone()
    if row is None:
        return None
    number, oid, user, total, created = row
    return Invoice(number=number, order_id=oid, user=user, total=total, created_at=created)


@service.worker(CREATE_INVOICE_QUEUE, concurrency=8, events=True)
@from_message
@inbox.handler
async def invoice_manager(task: Delivery[CreateInvoice], tx: Any, db: InvoicesDb) -> None:
    """Write the invoice and its event together, once per task id (the inbox's transaction, ``tx``)."""
    command = task.value
    created = datetime.now(UTC)
    number = f"INV-{command.order_id}"
    await tx.execute(
        "INSERT INTO invoices (number, order_id, user, total, created_at) VALUES (?, ?, ?, ?, ?)",
        (number, command.order_id, command.user, command.total, created.isoformat()),
    )
    event = InvoiceCreated(
        number=number, order_id=command.order_id, user=command.user, total=command.total, created_at=created
    )
    await db.outbox.add(
        tx, event.model_dump(mode="json"), exchange=EVENTS.name, routing_key=INVOICE_CREATED,
        message_id=event_id(INVOICE_CREATED, command.order_id), ordering_key=command.order_id,
        headers=correlation.headers(),
    )  # fmt: skip
    log.info("invoice %s for order %s: %.2f", number, command.order_id, command.total)
