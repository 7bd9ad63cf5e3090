"""The orders service: order-write (RPC) and the order-manager (a worker).

- **order-write**, RPC ``place`` on ``shop.orders``: checks the command and
  puts a ``PlaceOrder`` on the ``shop.place-order`` work queue, with the
  order id as the task id; the caller follows the task through its status
  events (``amqpkit.tasks``, ``shop.place-order.<status>``). ``status``
  answers what is stored about an order.
- **order-manager**, the worker: checks each item with the products service
  (RPC), then writes the order and its ``OrderCreated`` event in one SQLite
  transaction (the outbox), with the task recorded in the inbox in that same
  transaction, so that a redelivered task writes nothing twice; then calls
  invoice-write (RPC, synchronously) and so completes the task. An item out
  of stock rejects the task (its status: failed, with the reason); a
  service that does not answer makes it retry.

The outbox's relay runs in this process and publishes each committed event
to ``shop.events`` (and so to the event log), with confirms.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from amqpkit import Delivery, Reject, RemoteError, RetryPolicy, RpcClient
from amqpkit.outbox import Inbox, Outbox, Relay, SqliteStore, open_store
from amqpkit.service import Service, ServiceContext

from . import correlation
from .common import (
    EVENTS,
    INVOICES_RPC,
    ORDER_CREATED,
    ORDERS_RPC,
    PLACE_ORDER_QUEUE,
    PRODUCTS_RPC,
    CreateInvoice,
    InvoiceAccepted,
    Order,
    OrderAccepted,
    OrderCreated,
    PlaceOrder,
    Product,
    declare_event_log,
    event_id,
    sqlite_url,
)
from .correlation import from_message
from .tracing import setup_tracing

log = logging.getLogger("shop.orders")

service = Service("orders", version="1.0.0", description="Order-write and the order-manager.")
setup_tracing(service.name)


#: The order-manager's inbox: made with the handlers, bound to orders.db when the service opens it.
inbox = Inbox(consumer="order-manager")


@dataclass
class OrdersDb:
    store: SqliteStore
    outbox: Outbox


@dataclass
class Peers:
    """RPC clients of the services the order-manager calls."""

    products: RpcClient
    invoices: RpcClient


@service.resource
async def database(ctx: ServiceContext) -> AsyncIterator[OrdersDb]:
    """orders.db: the orders, the outbox and the inbox in one file; its relay runs while the service does."""
    store = await open_store(sqlite_url("orders"))
    assert isinstance(store, SqliteStore)
    async with store.transaction() as tx:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS orders (order_id TEXT PRIMARY KEY, user TEXT NOT NULL, items TEXT NOT NULL,"
            " total REAL NOT NULL, created_at TEXT NOT NULL)"
        )
    await declare_event_log(ctx.broker)
    try:
        async with Relay(store, ctx.broker, poll_interval=0.5), inbox.bind(store):
            yield OrdersDb(store, Outbox(store))
    finally:
        await store.close()


@service.resource
async def peers(ctx: ServiceContext) -> AsyncIterator[Peers]:
    async with RpcClient(ctx.broker, PRODUCTS_RPC.name) as products, RpcClient(ctx.broker, INVOICES_RPC.name) as inv:
        yield Peers(products, inv)


# ---------------------------------------------------------------------- order-write


@service.rpc(ORDERS_RPC)
@from_message
async def place(request: Delivery[PlaceOrder], ctx: ServiceContext) -> OrderAccepted:
    """Accept an order: queue the command for the order-manager; the task id is the order id."""
    command = request.value
    if any(item.quantity < 1 for item in command.items):
        raise ValueError("every item needs a quantity of at least 1")
    task_id = await ctx.work_queue(PLACE_ORDER_QUEUE).enqueue(
        command, task_id=command.order_id, headers=correlation.headers()
    )
    log.info("order %s of %s accepted (%d items)", command.order_id, command.user, len(command.items))
    return OrderAccepted(order_id=command.order_id, task_id=task_id)


@service.rpc(ORDERS_RPC)
@from_message
async def status(request: Delivery[str], db: OrdersDb) -> Order | None:
    """The order as stored, or null while the order-manager has not written it."""
    order_id = request.value
    async with db.store.transaction() as tx:
        cursor = await tx.execute(
            "SELECT order_id, user, items, total, created_at FROM orders WHERE order_id = ?", (order_id,)
        )
        row = await cursor.fetchone()
    if row is None:
        return None
    oid, user, items, total, created = row
    return Order(order_id=oid, user=user, items=json.loads(items), total=total, created_at=created)


# ---------------------------------------------------------------------- order-manager


#: A service that does not answer (products, invoices) makes the task retry: for about 100 s (0.5 s, doubling, at
#: most 15 s, 12 attempts), longer than a service's restart. Shorter, an order written before invoices went down
#: stayed without an invoice until the failed task was replayed by hand (4 attempts, 3.7 s: a hunt with invoices
#: restarted under load left 367 of 1,982 orders so).
PLACE_ORDER_RETRY = RetryPolicy(max_attempts=12, initial_delay=0.5, max_delay=15)


@service.worker(PLACE_ORDER_QUEUE, concurrency=8, events=True, retry=PLACE_ORDER_RETRY)
@from_message
async def order_manager(task: Delivery[PlaceOrder], db: OrdersDb, peers: Peers) -> None:
    """Write the order and its event (outbox), once (inbox); then have it invoiced (RPC to invoice-write)."""
    command = task.value
    total = 0.0
    for item in command.items:
        try:
            product = await peers.products.call(
                "get", item.product_id, returns=Product, timeout=5, headers=correlation.headers()
            )
        except RemoteError as exc:
            if exc.remote_type == "KeyError":  # not in the catalogue: no retry makes it so
                raise Reject(f"{item.product_id}: {exc.remote_message}") from None
            raise
        if product.stock < item.quantity:
            raise Reject(f"{product.name}: {product.stock} in stock, {item.quantity} ordered")
        total += product.price * item.quantity  # the catalogue's price, not the cart's
    total = round(total, 2)

    async def write(delivery: Delivery[Any], tx: Any) -> None:
        created = datetime.now(UTC)
        await tx.execute(
            "INSERT INTO orders (order_id, user, items, total, created_at) VALUES (?, ?, ?, ?, ?)",
            (command.order_id, command.user, json.dumps([i.model_dump() for i in command.items]), total,
             created.isoformat()),
        )  # fmt: skip
        event = OrderCreated(
            order_id=command.order_id, user=command.user, total=total, items=len(command.items), created_at=created
        )
        await db.outbox.add(
            tx, event.model_dump(mode="json"), exchange=EVENTS.name, routing_key=ORDER_CREATED,
            message_id=event_id(ORDER_CREATED, command.order_id), ordering_key=command.order_id,
            headers=correlation.headers(),
        )  # fmt: skip

    # The inbox's transaction covers the write only, not the RPC calls around it.
    await inbox.process(task, write)  # a redelivered task: already written, not again
    # invoice-write, synchronously. Sent again after a retry, it is harmless: the invoice-manager's inbox
    # takes the invoice task of an order once.
    accepted = await peers.invoices.call(
        "create", CreateInvoice(order_id=command.order_id, user=command.user, total=total),
        returns=InvoiceAccepted, timeout=10, headers=correlation.headers(),
    )  # fmt: skip
    log.info("order %s written (%.2f); invoice task %s", command.order_id, total, accepted.task_id)
