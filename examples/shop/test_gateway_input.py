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

from amqpkit.testing import vhost_of
from examples.shop.gateway import make_app
from tests.brokerctl import as_user, own_user, rabbitmqctl

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


async def test_a_request_the_broker_refuses_is_a_503(amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's user may no longer write (an operator narrowed its permissions): each RPC request is refused,
    a PublishError. It was a 500 'internal' with a traceback each time (155 of them in a hunt's 9 s revoke); the
    broker refusing is the service's unavailability, 503, as a lost connection is."""
    with own_user(amqp_url, "shop-gw", "shop-gw-password") as user:
        # may write anywhere but the default exchange, which every RPC request goes through
        rabbitmqctl("set_permissions", "-p", vhost_of(amqp_url), user, ".*", r"^(?!amq\.default$).*", ".*")
        monkeypatch.setenv("AMQP_URL", as_user(amqp_url, user, "shop-gw-password"))
        app = make_app()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://shop") as http,
        ):
            response = await http.post("/cart/add", headers=ADA, json={"product_id": "p1"})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "service_unavailable"
