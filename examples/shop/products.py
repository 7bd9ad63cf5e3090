"""The products service: the catalogue, over RPC (``list``, ``get``) on ``shop.products``.

Run it with ``amqpkit run examples.shop.products:service``; run it twice and
the two processes share the request queue as competing consumers (load
balancing, without a balancer). ``SHOP_PRODUCTS_DELAY`` (seconds) makes every
answer late, to see the gateway's 504.
"""

from __future__ import annotations

import asyncio
import logging
import os

from amqpkit import Delivery
from amqpkit.service import Service

from .common import PRODUCTS_RPC, Product
from .correlation import from_message
from .tracing import setup_tracing

log = logging.getLogger("shop.products")

CATALOGUE = [
    Product(id="p1", name="espresso cup", price=9.5, stock=120),
    Product(id="p2", name="moka pot", price=34.0, stock=15),
    Product(id="p3", name="coffee beans, 1 kg", price=21.9, stock=300),
    Product(id="p4", name="milk jug", price=14.25, stock=0),  # out of stock: ordering it fails the task
]
BY_ID = {p.id: p for p in CATALOGUE}

service = Service("products", version="1.0.0", description="The shop's catalogue.")
setup_tracing(service.name)


async def _delay() -> None:
    delay = float(os.environ.get("SHOP_PRODUCTS_DELAY") or 0)
    if delay > 0:
        await asyncio.sleep(delay)


@service.rpc(PRODUCTS_RPC, "list")
@from_message
async def list_products(request: Delivery[int]) -> list[Product]:
    """The first ``limit`` products."""
    await _delay()
    return CATALOGUE[: request.value]


@service.rpc(PRODUCTS_RPC)
@from_message
async def get(request: Delivery[str]) -> Product:
    """One product; a KeyError (the gateway's 404) for an id the catalogue does not have."""
    product_id = request.value
    await _delay()
    log.info("product %s asked for (pid %d)", product_id, os.getpid())
    try:
        return BY_ID[product_id]
    except KeyError:
        raise KeyError(f"no product {product_id!r}") from None
