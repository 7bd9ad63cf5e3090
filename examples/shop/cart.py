"""The cart service: each user's cart, over RPC (``add``, ``get``, ``clear``) on ``shop.cart``.

The carts live in the service's SQLite file (``<SHOP_DATA>/cart.db``), so
two instances of the service, or one started again, see the same carts.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiosqlite

from amqpkit import Delivery
from amqpkit.service import Service

from .common import CART_RPC, Cart, CartAdd, CartItem, data_dir
from .correlation import from_message
from .tracing import setup_tracing

log = logging.getLogger("shop.cart")

service = Service("cart", version="1.0.0", description="Shopping carts, one per user.")
setup_tracing(service.name)


class Carts:
    """The carts table: (user, product) -> name, price, quantity."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def add(self, user: str, item: CartItem) -> Cart:
        await self.db.execute(
            "INSERT INTO cart (user, product_id, name, price, quantity) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (user, product_id) DO UPDATE SET quantity = min(quantity + excluded.quantity, 100),"
            " price = excluded.price, name = excluded.name",
            (user, item.product_id, item.name, item.price, item.quantity),
        )
        await self.db.commit()
        return await self.get(user)

    async def get(self, user: str) -> Cart:
        cursor = await self.db.execute(
            "SELECT product_id, name, price, quantity FROM cart WHERE user = ? ORDER BY product_id", (user,)
        )
        rows = await cursor.fetchall()
        items = [CartItem(product_id=p, name=n, price=pr, quantity=q) for p, n, pr, q in rows]
        return Cart(user=user, items=items)

    async def clear(self, user: str) -> Cart:
        await self.db.execute("DELETE FROM cart WHERE user = ?", (user,))
        await self.db.commit()
        return Cart(user=user)


@service.resource
async def carts() -> AsyncIterator[Carts]:
    """The cart database, open while the service runs."""
    db = await aiosqlite.connect(data_dir() / "cart.db", timeout=30)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute(
        "CREATE TABLE IF NOT EXISTS cart (user TEXT NOT NULL, product_id TEXT NOT NULL, name TEXT NOT NULL,"
        " price REAL NOT NULL, quantity INTEGER NOT NULL, PRIMARY KEY (user, product_id))"
    )
    await db.commit()
    try:
        yield Carts(db)
    finally:
        await db.close()


@service.rpc(CART_RPC)
@from_message
async def add(request: Delivery[CartAdd], store: Carts) -> Cart:
    """Add an item (quantities add up, to at most 100 of a product); the cart as it is now."""
    wanted = request.value
    cart = await store.add(wanted.user, wanted.item)
    log.info("cart of %s: %d of %s added", wanted.user, wanted.item.quantity, wanted.item.product_id)
    return cart


@service.rpc(CART_RPC)
@from_message
async def get(request: Delivery[str], store: Carts) -> Cart:
    """The user's cart."""
    return await store.get(request.value)


@service.rpc(CART_RPC)
@from_message
async def clear(request: Delivery[str], store: Carts) -> Cart:
    """Empty the user's cart."""
    log.info("cart of %s cleared", request.value)
    return await store.clear(request.value)
