"""The shop: a cut of the gateway's connection after order-write accepted an order gives 503, and a retry doubles it.

Found by a hunt (a 2.5-minute load on RabbitMQ 4.0.5 with two node restarts: 3 of 2,349 orders accepted by
order-write were answered 503 "the broker connection was lost"; their carts stayed full). The gateway makes a
new order id for each POST /order/place, calls order-write's ``place`` (which queues the order for good) and
clears the cart only after the reply. When a cut loses the reply, the call ends with ``ConnectionLost``,
mapped to 503 "service_unavailable" (try again), though the order is queued; the cart is not cleared, so the
retry the 503 invites places the same cart again as a second order. (amqpkit documents an RPC request as
at-most-once, its outcome hidden by a cut; the example's place is not idempotent.)

Products, cart and orders run in-process on the test's vhost; the gateway runs its own lifespan under
httpx's ASGI transport and reaches the broker through the fault proxy, which is cut the moment order-write
logs the order as accepted, before its reply is sent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from amqpkit.testing import ServiceRunner
from examples.shop import cart, orders, products
from examples.shop.gateway import lifespan, make_app

from ..reliability.proxy import FaultProxy

ADA = {"X-API-Key": "demo-key-ada"}


class CutOnAccept(logging.Handler):
    """Cuts the gateway's link when order-write logs "order ... accepted"; keeps the accepted order ids."""

    def __init__(self, proxy: FaultProxy) -> None:
        super().__init__()
        self.proxy, self.accepted, self.armed = proxy, list[str](), True

    def emit(self, record: logging.LogRecord) -> None:
        if "accepted" in record.getMessage():
            self.accepted.append(str(record.args[0]))  # type: ignore[index]
            if self.armed:
                self.armed = False
                self.proxy.cut()


async def test_a_503_for_place_means_no_order_was_placed(
    service_runner: ServiceRunner, amqp_url: str, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_DATA", str(tmp_path))
    parts = urlsplit(amqp_url)
    through = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("AMQP_URL", urlunsplit(through))  # the gateway's connection only
    for svc in (products.service, cart.service, orders.service):
        await service_runner(svc)
    watch = CutOnAccept(proxy)
    log = logging.getLogger("shop.orders")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(watch)
    app = make_app()
    try:
        async with lifespan(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as gw:
            assert (await gw.post("/cart/add", headers=ADA, json={"product_id": "p1"})).status_code == 200
            first = await gw.post("/order/place", headers=ADA)
            assert watch.accepted, first.text  # order-write accepted it, and the link was cut then
            for _ in range(50):  # a 503 invites a retry: the gateway reconnects in well under a second
                retry = await gw.post("/order/place", headers=ADA)
                if retry.status_code != 503:
                    break
    finally:
        log.removeHandler(watch)
        log.setLevel(level)
    # (first answer, distinct orders accepted for one cart of one item: the gateway may send the same order again)
    assert (first.status_code, len(set(watch.accepted))) == (202, 1), (first.text, watch.accepted)
