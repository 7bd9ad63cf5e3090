"""A sample amqpkit service: billing for a shop.

- a **subscriber** takes ``order.placed`` events from the ``shop.orders``
  topic exchange (a shared queue, so every running copy shares them) and
  queues an invoice task for each;
- a **worker** runs those tasks from the ``billing.invoices`` work queue
  (retried with backoff, dead-lettered after the last attempt), records the
  invoice in the ledger and announces it on ``shop.invoices``;
- two **RPC methods** on ``billing.rpc``: ``quote`` (the price with tax) and
  ``invoice_for`` (an order's invoice, if issued).

The ledger is the service's *resource*: made at startup, closed at
shutdown, and handed to the handlers that ask for it by type. It keeps
invoices in memory, standing in for a database pool.

Run it from the checkout's root::

    amqpkit run examples.billing:service --health-port 8080

and write its AsyncAPI document with ``amqpkit asyncapi examples.billing:service``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field

from amqpkit import Exchange
from amqpkit.service import Service, ServiceContext

log = logging.getLogger("examples.billing")

TAX_RATES = {"DE": 0.19, "FR": 0.20, "NL": 0.21}


class OrderPlaced(BaseModel):
    """An order a customer placed (published by the shop on ``shop.orders`` as ``order.placed``)."""

    order_id: int
    customer: str
    total: float = Field(ge=0, description="net amount, in euros")
    country: str = "DE"


class Invoice(BaseModel):
    """An invoice the billing service issued (announced on ``shop.invoices`` as ``invoice.created``)."""

    number: str
    order_id: int
    net: float
    tax: float
    gross: float


class QuoteRequest(BaseModel):
    total: float = Field(ge=0)
    country: str = "DE"


class Quote(BaseModel):
    net: float
    tax: float
    gross: float


class Ledger:
    """The invoices issued so far, one per order (issuing again returns the same invoice)."""

    def __init__(self) -> None:
        self.invoices: dict[int, Invoice] = {}
        self.open = True

    def issue(self, order: OrderPlaced) -> Invoice:
        if order.order_id not in self.invoices:
            q = price(order.total, order.country)
            number = f"INV-{len(self.invoices) + 1:05d}"
            self.invoices[order.order_id] = Invoice(
                number=number, order_id=order.order_id, net=q.net, tax=q.tax, gross=q.gross
            )
        return self.invoices[order.order_id]

    async def close(self) -> None:
        self.open = False


def price(total: float, country: str) -> Quote:
    tax = round(total * TAX_RATES.get(country, 0.0), 2)
    return Quote(net=total, tax=tax, gross=round(total + tax, 2))


service = Service("billing", version="1.0.0", description="Invoices for the shop's orders, and price quotes.")

orders = Exchange("shop.orders", type="topic")
invoices = Exchange("shop.invoices", type="topic")
invoice_created = service.publisher(
    invoices, Invoice, routing_key="invoice.created", description="an invoice was issued"
)


@service.resource
async def ledger() -> AsyncIterator[Ledger]:
    """The ledger, open while the service runs."""
    book = Ledger()
    yield book
    await book.close()


@service.subscriber(orders, binding_keys=["order.placed"], queue="billing.orders")
async def on_order_placed(order: OrderPlaced, ctx: ServiceContext) -> None:
    """An order was placed: queue the task that invoices it."""
    await ctx.work_queue("billing.invoices").enqueue(order, task_id=f"invoice-{order.order_id}")


@service.worker("billing.invoices", concurrency=4)
async def issue_invoice(order: OrderPlaced, book: Ledger, ctx: ServiceContext) -> None:
    """Issue the order's invoice (once per order) and announce it."""
    invoice = book.issue(order)
    await ctx.publisher(invoice_created).publish(invoice, routing_key="invoice.created")
    log.info("invoice %s for order %d: %.2f", invoice.number, order.order_id, invoice.gross)


@service.rpc("billing.rpc")
async def quote(request: QuoteRequest) -> Quote:
    """The price of an order, with tax."""
    return price(request.total, request.country)


@service.rpc("billing.rpc")
async def invoice_for(order_id: int, book: Ledger) -> Invoice | None:
    """The invoice of an order, or null while it has none."""
    return book.invoices.get(order_id)
