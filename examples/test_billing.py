"""The billing example, tested as a user of amqpkit would: with the pytest plugin's fixtures and a real broker.

``amqp_url`` is a vhost made for this test alone; ``service_runner`` runs the
service in this process on it; ``amqp_broker`` is a connection of the test's
own on the same vhost. Nothing here comes from the project's tests/ folder.
"""

from __future__ import annotations

import asyncio

from amqpkit import Broker, Publisher, RpcClient, Subscriber
from amqpkit.testing import ServiceRunner
from examples.billing import Invoice, Ledger, OrderPlaced, Quote, QuoteRequest, invoices, orders, service


async def test_an_order_is_invoiced_once_and_quotes_are_served(
    service_runner: ServiceRunner, amqp_broker: Broker
) -> None:
    running = await service_runner(service)
    assert running.ready

    announced: asyncio.Queue[Invoice] = asyncio.Queue()

    async def on_invoice(invoice: Invoice) -> None:
        await announced.put(invoice)

    async with (
        Subscriber(amqp_broker, invoices, on_invoice, binding_keys=["invoice.created"]),
        RpcClient(amqp_broker, "billing.rpc") as billing,
    ):
        quote = await billing.call("quote", QuoteRequest(total=50, country="FR"), returns=Quote, timeout=10)
        assert quote == Quote(net=50, tax=10, gross=60)

        order = OrderPlaced(order_id=42, customer="ada", total=100, country="DE")
        await Publisher(amqp_broker, orders).publish(order, routing_key="order.placed")
        invoice = await asyncio.wait_for(announced.get(), 30)
        assert (invoice.order_id, invoice.gross) == (42, 119.0)

        # The same order again (a redelivery, a retry upstream): the ledger issues no second invoice.
        await Publisher(amqp_broker, orders).publish(order, routing_key="order.placed")
        again = await asyncio.wait_for(announced.get(), 30)
        assert again.number == invoice.number
        assert await billing.call("invoice_for", 42, returns=Invoice, timeout=10) == invoice
        assert await billing.call("invoice_for", 43, timeout=10) is None

    assert len(running.context.get(Ledger).invoices) == 1
