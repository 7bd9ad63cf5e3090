"""Bad input at the gateway: each gets a 4xx with a JSON error saying what was wrong, not a 500 "internal error".

Found by a hunt. The gateway maps a body that is not JSON or fails the model to 422, but three bodies a
client may send fall through to the catch-all (500 ``internal``, and uvicorn logs a traceback each time):
a string with a lone surrogate escape (``"\\ud800"``, valid JSON; the RPC request cannot be encoded as
UTF-8: UnicodeEncodeError), an array nested 100,000 deep (RecursionError in the JSON decoder), and a
20 MB product id (the RPC request is over amqpkit's max_message_size: MessageTooLarge). The gateway runs
in-process (its lifespan entered by the test, requests through httpx's ASGI transport) against the test's
vhost; no service is needed: each request fails before any call is answered.
"""

from __future__ import annotations

import json

import httpx
import pytest

from examples.shop.gateway import make_app

ADA = {"X-API-Key": "demo-key-ada"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"product_id": "\\ud800"}',
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({"product_id": "p" * 20_000_000}).encode(),
    ],
    ids=["lone-surrogate", "nested-100000-deep", "20-MB-product-id"],
)
async def test_a_bad_body_is_a_client_error(body: bytes, amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", amqp_url)
    app = make_app()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
        response = await http.post("/cart/add", headers=ADA, content=body)
    error = response.json()["error"]
    assert 400 <= response.status_code < 500 and error["code"] != "internal", (response.status_code, error)
