"""The reviews service: what customers said about a product, over RPC (``for_product``) on ``shop.reviews``.

The gateway asks it alongside the products service and merges the answers;
when it is down, a product page is still served, marked partial.
"""

from __future__ import annotations

from amqpkit import Delivery
from amqpkit.service import Service

from .common import REVIEWS_RPC, Review
from .correlation import from_message
from .tracing import setup_tracing

REVIEWS = [
    Review(product_id="p1", author="ada", stars=5, text="Holds heat well."),
    Review(product_id="p1", author="bob", stars=4, text="Smaller than it looks."),
    Review(product_id="p2", author="ada", stars=5, text="Makes a proper cup."),
    Review(product_id="p3", author="cy", stars=3, text="Fine beans, a bit dark."),
]

service = Service("reviews", version="1.0.0", description="Product reviews.")
setup_tracing(service.name)


@service.rpc(REVIEWS_RPC)
@from_message
async def for_product(request: Delivery[str]) -> list[Review]:
    """The reviews of a product (none for an unknown one)."""
    return [r for r in REVIEWS if r.product_id == request.value]
