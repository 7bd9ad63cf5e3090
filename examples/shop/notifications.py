"""The notifications service: one log line for each ``OrderCreated`` and ``InvoiceCreated`` event.

A shared queue (``shop.notifications``): instances share the events. It
stands in for the mail a real shop would send.
"""

from __future__ import annotations

import logging
from typing import Any

from amqpkit import Delivery
from amqpkit.service import Service

from .common import EVENTS, INVOICE_CREATED, ORDER_CREATED
from .correlation import from_message
from .tracing import setup_tracing

log = logging.getLogger("shop.notifications")

service = Service("notifications", version="1.0.0", description="Tells the customer (here: the log).")
setup_tracing(service.name)


@service.subscriber(EVENTS, binding_keys=[ORDER_CREATED, INVOICE_CREATED], queue="shop.notifications")
@from_message
async def notify(event: Delivery[dict[str, Any]]) -> None:
    """One line per event."""
    body = event.value
    if event.routing_key == ORDER_CREATED:
        log.info("to %s: your order %s (%.2f) is placed", body["user"], body["order_id"], body["total"])
    else:
        log.info("to %s: invoice %s for order %s is ready", body["user"], body["number"], body["order_id"])
