"""What the shop's services share: the messages, the names on the broker, where the data lives.

Every service module imports this and nothing from the others: the
contracts between them are these models and these names, as they would be
in a package of their own.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field, computed_field

from amqpkit import Broker, Exchange, ExchangeType, Queue, QueueType
from amqpkit.topology import Binding

# ---------------------------------------------------------------------- names on the broker

# RPC request queues. Auto-delete: once the last server of a queue is gone, so is the queue, and a
# call fails at once with NoResponder (the gateway's 503) instead of waiting in a queue nobody reads.
PRODUCTS_RPC = Queue("shop.products", auto_delete=True)
REVIEWS_RPC = Queue("shop.reviews", auto_delete=True)
CART_RPC = Queue("shop.cart", auto_delete=True)
ORDERS_RPC = Queue("shop.orders", auto_delete=True)  # order-write
INVOICES_RPC = Queue("shop.invoices", auto_delete=True)  # invoice-write
HISTORY_RPC = Queue("shop.history", auto_delete=True)  # the read side

# Work queues (quorum, retried, dead-lettered; task status events on amqpkit.tasks).
PLACE_ORDER_QUEUE = "shop.place-order"  # PlaceOrder commands, run by the order-manager
CREATE_INVOICE_QUEUE = "shop.create-invoice"  # CreateInvoice commands, run by the invoice-manager

# Domain events: a topic exchange, and the event log every event is also appended to (a stream queue).
EVENTS = Exchange("shop.events", type=ExchangeType.TOPIC)
EVENT_LOG = Queue("shop.events.log", type=QueueType.STREAM)
ORDER_CREATED = "order.created"
INVOICE_CREATED = "invoice.created"


async def declare_event_log(broker: Broker) -> None:
    """The events exchange and the stream that keeps every event, bound to all of them (``#``).

    Every service that writes events declares it at startup, so that the
    log exists before the first event is sent.
    """
    await broker.declare(EVENTS, EVENT_LOG, Binding(EVENTS, EVENT_LOG, "#"))


def event_id(kind: str, order_id: str) -> str:
    """The message id of an event: one per order and kind, so a resent event is recognised as the same one."""
    return f"{kind}:{order_id}"


# ---------------------------------------------------------------------- where the data lives


def data_dir() -> Path:
    """The folder of the services' SQLite files: ``SHOP_DATA``, else a folder in the temporary directory."""
    path = Path(os.environ.get("SHOP_DATA") or Path(tempfile.gettempdir()) / "amqpkit-shop")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sqlite_url(name: str) -> str:
    """``sqlite:///<data>/<name>.db``: one database file per service."""
    return f"sqlite:///{data_dir() / f'{name}.db'}"


# ---------------------------------------------------------------------- messages


class Product(BaseModel):
    id: str
    name: str
    price: float = Field(ge=0)
    stock: int = Field(ge=0)


class Review(BaseModel):
    product_id: str
    author: str
    stars: int = Field(ge=1, le=5)
    text: str


class CartItem(BaseModel):
    product_id: str
    name: str
    price: float = Field(ge=0)
    quantity: int = Field(ge=1, le=100)


class CartAdd(BaseModel):
    user: str
    item: CartItem


class Cart(BaseModel):
    user: str
    items: list[CartItem] = []

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total(self) -> float:
        return round(sum(i.price * i.quantity for i in self.items), 2)


class PlaceOrder(BaseModel):
    """The command to place an order (order-write sends it to the order-manager's work queue)."""

    order_id: str
    user: str
    items: list[CartItem] = Field(min_length=1)


class OrderAccepted(BaseModel):
    order_id: str
    task_id: str


class Order(BaseModel):
    order_id: str
    user: str
    items: list[CartItem]
    total: float
    created_at: datetime


class OrderCreated(BaseModel):
    """Event: an order was written (sent through the orders service's outbox)."""

    order_id: str
    user: str
    total: float
    items: int
    created_at: datetime


class CreateInvoice(BaseModel):
    """The command to invoice an order (invoice-write sends it to the invoice-manager's work queue)."""

    order_id: str
    user: str
    total: float


class InvoiceAccepted(BaseModel):
    task_id: str


class Invoice(BaseModel):
    number: str
    order_id: str
    user: str
    total: float
    created_at: datetime


class InvoiceCreated(BaseModel):
    """Event: an invoice was written (sent through the invoices service's outbox)."""

    number: str
    order_id: str
    user: str
    total: float
    created_at: datetime


class HistoryEntry(BaseModel):
    """One order as the read side sees it, built from events only."""

    order_id: str
    user: str
    total: float
    items: int
    created_at: datetime | None
    invoice: str | None
    invoiced_at: datetime | None
    events: int  # how many events were applied to this entry: two once invoiced, never more


class HistoryStats(BaseModel):
    applied: int
    duplicates: int
