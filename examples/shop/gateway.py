"""The API gateway: HTTP in front of the shop's services (an ASGI app, Starlette on uvicorn).

Every route is a call to one or more services over AMQP: RPC where the
caller needs the answer to respond (products, reviews, cart, order-write,
the read side), and task status *events* for what happens after the
response (the order-manager's work). What the gateway adds:

- **authentication**: an API key in ``X-API-Key`` (missing: 401, unknown:
  403); the keys and their users come from ``SHOP_API_KEYS``
  (``key:user,key:user:limit/window``), by default the README's demo keys;
- **rate limiting**: per key, ``SHOP_RATE_LIMIT`` requests per window
  (``100/60``: 100 a minute), or the key's own limit, as a moving window
  kept by the ``limits`` library; over it, 429 with ``Retry-After`` (the
  seconds until the oldest counted request leaves the window, rounded up);
- **caching**: product reads for ``SHOP_CACHE_TTL`` seconds (10); the
  response says ``"cached": true`` and ``X-Cache: hit``;
- **aggregation**: ``GET /products/{id}`` asks products and reviews at once,
  each with its own timeout; without reviews the answer is marked partial;
- **error mapping**: no server for a queue (``NoResponder``) 503, no answer
  in time (``RpcTimeout``) 504, the service refused the input
  (``RemoteError`` of a ``ValueError``/``ValidationError``) 422, it failed
  otherwise 502; always a JSON body, never a traceback;
- **logs**: one line per request (method, path, status, duration, trace id,
  request id);
- **a request id** (``X-Request-ID``, taken from the caller or made here) in
  a header of every message the request causes, and in the log lines every
  service writes for it (:mod:`.correlation`).

``python -m examples.shop gateway --port 8080`` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from amqpkit import (
    Broker,
    BrokerSettings,
    ConnectionLost,
    InvalidMessage,
    MessageTooLarge,
    NoResponder,
    PublishError,
    RemoteError,
    RpcClient,
    RpcError,
    RpcTimeout,
    Subscriber,
    TaskEvent,
)
from amqpkit.patterns.work_queue import TASK_EVENTS_EXCHANGE

from . import correlation, tracing
from .common import (
    CART_RPC,
    HISTORY_RPC,
    INVOICES_RPC,
    ORDERS_RPC,
    PLACE_ORDER_QUEUE,
    PRODUCTS_RPC,
    REVIEWS_RPC,
    Cart,
    CartAdd,
    CartItem,
    OrderAccepted,
    PlaceOrder,
    Product,
    Review,
)

log = logging.getLogger("shop.gateway")
T = TypeVar("T")

DEMO_KEYS = "demo-key-ada:ada,demo-key-bob:bob,demo-key-cy:cy:5/60"  # cy: a low limit, to see a 429
PUBLIC_PATHS = {"/healthz"}


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


# ---------------------------------------------------------------------- the gateway's own state


class RateLimiter:
    """At most ``limit`` requests per ``window`` seconds per key: a moving window, kept by the ``limits`` library.

    ``limits``' :class:`~limits.strategies.MovingWindowRateLimiter` over its
    in-process :class:`~limits.storage.MemoryStorage` (one gateway process;
    several would share a ``limits`` storage such as Redis instead). The
    window is whole seconds, as ``limits`` counts them. The memory storage's
    calls are in-process and short (a lock and a list), so the gateway makes
    them on its event loop; ``limits.aio`` is not used as its memory storage
    sweeps expired entries with a thread hop per key.
    """

    def __init__(self, limit: int, window: int, storage: MemoryStorage | None = None) -> None:
        if limit < 1 or window < 1:
            raise ValueError(f"a rate limit is at least 1 request in at least 1 s, not {limit}/{window}")
        self.limit = limit
        self.window = window
        self._item = RateLimitItemPerSecond(limit, window)
        self._limiter = MovingWindowRateLimiter(storage or MemoryStorage())

    @classmethod
    def from_text(cls, text: str, storage: MemoryStorage | None = None) -> RateLimiter:
        """``limit/window`` (``100/60``: 100 a minute); the window defaults to 60 s."""
        limit, _, window = text.partition("/")
        return cls(int(limit), int(window or 60), storage)

    def check(self, key: str) -> float | None:
        """None if the request may go (it is counted); else the seconds until it may (for Retry-After)."""
        if self._limiter.hit(self._item, key):
            return None
        reset_at, _ = self._limiter.get_window_stats(self._item, key)  # when the oldest request leaves the window
        return max(0.0, reset_at - time.time())


class TtlCache:
    """Values kept for ``ttl`` seconds."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._items: dict[str, tuple[float, Any]] = {}

    def get(self, key: str) -> Any | None:
        found = self._items.get(key)
        if found is None or found[0] < time.monotonic():
            self._items.pop(key, None)
            return None
        return found[1]

    def put(self, key: str, value: Any) -> None:
        if self.ttl > 0:
            self._items[key] = (time.monotonic() + self.ttl, value)


RANK = {"pending": 0, "running": 1, "completed": 2, "failed": 2}


@dataclass
class TaskView:
    task_id: str
    user: str
    status: str = "pending"
    attempt: int = 1
    error: str | None = None
    history: list[str] = field(default_factory=list)
    times: dict[str, str] = field(default_factory=dict)  # when each status was first reported (the event's time)

    def public(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "status": self.status, "attempt": self.attempt, "error": self.error,
                "history": self.history, "times": self.times}  # fmt: skip


class Tasks:
    """Order tasks placed through this gateway, kept up to date from their status events.

    The work queue's statuses map onto the four the API shows: pending;
    running (and retrying: running again soon); completed; failed (dead-lettered,
    with the reason). A status does not go back, as events sent over two
    connections may arrive out of order; except that a failed task replayed
    from the dead-letter queue (``amqpkit dlq replay``) runs again: an event
    stamped after the failure moves it on. Completed is final.
    """

    EARLY_LIMIT = 10_000
    # Views kept: the latest placed, so the gateway's memory stays level (about 750 bytes a view; before, every
    # order ever placed was kept). An older one's GET /tasks/{id} is a 404; GET /orders/{id} still answers.
    KEPT_LIMIT = 10_000

    def __init__(self) -> None:
        self.tasks: dict[str, TaskView] = {}
        self.early: dict[str, list[TaskEvent]] = {}  # events that came before the RPC's answer
        self._failed_at: dict[str, datetime] = {}

    def placed(self, task_id: str, user: str) -> TaskView:
        view = self.tasks.setdefault(task_id, TaskView(task_id, user))
        while len(self.tasks) > self.KEPT_LIMIT:
            oldest = next(iter(self.tasks))
            del self.tasks[oldest]
            self._failed_at.pop(oldest, None)
        for event in self.early.pop(task_id, []):
            self.update(event)
        return view

    def update(self, event: TaskEvent) -> None:
        view = self.tasks.get(event.task_id)
        if view is None:  # not placed here, or placed and its answer not back yet
            self.early.setdefault(event.task_id, []).append(event)
            while len(self.early) > self.EARLY_LIMIT:
                self.early.pop(next(iter(self.early)))
            return
        status = {"retrying": "running", "dead_lettered": "failed", "progress": "running"}.get(
            event.status.value, event.status.value
        )
        if status not in RANK:
            return
        view.history.append(event.status.value)
        view.times.setdefault(status, event.timestamp.isoformat())
        failed_at = self._failed_at.get(view.task_id)
        replayed = view.status == "failed" and failed_at is not None and event.timestamp > failed_at
        if replayed or (RANK[status] >= RANK[view.status] and view.status not in ("completed", "failed")):
            view.status = status
            view.attempt = event.attempt
            view.error = event.error if status == "failed" else None
            if status == "failed":
                self._failed_at[view.task_id] = event.timestamp
                view.times["failed"] = event.timestamp.isoformat()
            elif status == "completed":
                view.times["completed"] = event.timestamp.isoformat()


@dataclass
class Backend:
    broker: Broker
    products: RpcClient
    reviews: RpcClient
    cart: RpcClient
    orders: RpcClient
    invoices: RpcClient
    history: RpcClient
    tasks: Tasks
    cache: TtlCache
    keys: dict[str, tuple[str, RateLimiter]]  # API key -> user, and the key's rate limit
    timeout: float
    reviews_timeout: float

    def call_args(self, timeout: float | None = None) -> dict[str, Any]:
        """An RPC call's timeout, and the request id in its headers: every call is made on a request's behalf."""
        return {"timeout": self.timeout if timeout is None else timeout, "headers": correlation.headers()}


def backend(request: Request) -> Backend:
    return request.app.state.backend  # type: ignore[no-any-return]


def user_of(request: Request) -> str:
    return request.state.user  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- routes


class AddToCart(BaseModel):
    product_id: str
    quantity: int = Field(default=1, ge=1, le=100)


async def healthz(request: Request) -> Response:
    ok = backend(request).broker.is_connected
    return JSONResponse({"status": "ok" if ok else "not connected"}, status_code=200 if ok else 503)


async def product_of(b: Backend, product_id: str) -> tuple[Product, bool]:
    """The product (from the cache when it is there) and whether it came from the cache."""
    cached = b.cache.get(f"product:{product_id}")
    if cached is not None:
        return cached, True
    try:
        product = await b.products.call("get", product_id, returns=Product, **b.call_args())
    except RemoteError as exc:
        if exc.remote_type == "KeyError":
            raise HTTPException(404, f"no product {product_id!r}") from None
        raise
    b.cache.put(f"product:{product_id}", product)
    return product, False


def cache_header(response: Response, hit: bool) -> Response:
    response.headers["X-Cache"] = "hit" if hit else "miss"
    return response


async def list_products(request: Request) -> Response:
    b = backend(request)
    cached: list[Product] | None = b.cache.get("products")
    hit = cached is not None
    products = cached
    if products is None:
        products = await b.products.call("list", 100, returns=list[Product], **b.call_args())
        b.cache.put("products", products)
    body = {"products": [p.model_dump() for p in products], "cached": hit}
    return cache_header(JSONResponse(body), hit)


async def get_product(request: Request) -> Response:
    """The product and its reviews, asked at once; without reviews (down, late), a partial answer."""
    b = backend(request)
    product_id = request.path_params["product_id"]
    reviews_call = asyncio.ensure_future(
        b.reviews.call("for_product", product_id, returns=list[Review], **b.call_args(b.reviews_timeout))
    )
    try:
        product, hit = await product_of(b, product_id)
    except BaseException:
        reviews_call.cancel()
        with contextlib.suppress(BaseException):
            await reviews_call
        raise
    body: dict[str, Any] = {"product": product.model_dump(), "cached": hit, "partial": False}
    try:
        reviews: list[Review] = await reviews_call
        body["reviews"] = [r.model_dump() for r in reviews]
    except (RpcError, ConnectionLost) as exc:
        body.update(partial=True, reviews=None, missing={"reviews": _reason(exc)})
    return cache_header(JSONResponse(body), hit)


MAX_BODY = 64 * 1024  # bytes of a request body: a cart item is a few dozen


async def json_body(request: Request) -> Any:
    """The request's body as JSON: 413 past MAX_BODY, 422 when it is not JSON (nested too deeply included)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"the body is over {MAX_BODY} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise HTTPException(422, "the body is not JSON") from None


async def add_to_cart(request: Request) -> Response:
    b = backend(request)
    try:
        wanted = AddToCart.model_validate(await json_body(request))
    except ValidationError as exc:
        raise HTTPException(422, _validation_text(exc)) from None
    product, _ = await product_of(b, wanted.product_id)
    item = CartItem(product_id=product.id, name=product.name, price=product.price, quantity=wanted.quantity)
    cart = await b.cart.call("add", CartAdd(user=user_of(request), item=item), returns=Cart, **b.call_args())
    return JSONResponse(cart.model_dump())


async def get_cart(request: Request) -> Response:
    b = backend(request)
    cart = await b.cart.call("get", user_of(request), returns=Cart, **b.call_args())
    return JSONResponse(cart.model_dump())


async def again_if_cut(call: Callable[[], Awaitable[T]], attempts: int = 3) -> T:
    """``call()``, made again (up to ``attempts`` in all) when the connection was lost before its reply: only for
    a call that is safe to run twice."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except ConnectionLost:
            if attempt == attempts:
                raise
            await asyncio.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def order_id_for(user: str, key: str | None) -> str:
    """A new order's id; with the client's ``Idempotency-Key``, the same id for the same user and key."""
    if key is None:
        return f"o-{uuid.uuid4().hex[:12]}"
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise HTTPException(422, "the Idempotency-Key header must be 1 to 255 visible ASCII characters")
    digest = hashlib.sha256(f"{user}\n{key}".encode()).hexdigest()
    return f"o-{digest[:12]}"


def accepted(order_id: str, task_id: str, replayed: bool = False) -> JSONResponse:
    body = {"order_id": order_id, "task_id": task_id, "status_url": f"/tasks/{task_id}",
            "order_url": f"/orders/{order_id}"}  # fmt: skip
    headers = {"Location": f"/tasks/{task_id}"} | ({"Idempotent-Replayed": "true"} if replayed else {})
    return JSONResponse(body, status_code=202, headers=headers)


async def place_order(request: Request) -> Response:
    """202: the order is accepted; its task says how it goes (``GET /tasks/{id}``).

    With an ``Idempotency-Key`` header the order's id comes from the user and the key, so a request sent again
    (its answer lost, or a 504 after the order went through) is the same order: answered as the first time once
    the order is written, and placed again under the same id before that, which the order-manager's inbox takes
    once. The cart is left as it is when the order was already written."""
    b = backend(request)
    user = user_of(request)
    key = request.headers.get("Idempotency-Key")
    order_id = order_id_for(user, key)
    if key is not None and (
        task_of(request, order_id) is not None  # placed here: no need to ask
        or await b.orders.call("status", order_id, **b.call_args()) is not None
    ):
        return accepted(order_id, order_id, replayed=True)  # the task's id is the order's (order-write)
    cart = await b.cart.call("get", user, returns=Cart, **b.call_args())
    if not cart.items:
        raise HTTPException(422, "the cart is empty")
    command = PlaceOrder(order_id=order_id, user=user, items=cart.items)
    # Both sent again after a cut that hid their outcome: the order's id makes a second place the same order
    # (the order-manager's inbox takes an order once), and a clear is a clear. Answered 503 instead, a placed
    # order's cart stayed full, and the retry the 503 invites placed it a second time.
    answer = await again_if_cut(lambda: b.orders.call("place", command, returns=OrderAccepted, **b.call_args()))
    b.tasks.placed(answer.task_id, user)
    await again_if_cut(lambda: b.cart.call("clear", user, returns=Cart, **b.call_args()))
    return accepted(order_id, answer.task_id)


def task_of(request: Request, task_id: str) -> TaskView | None:
    view = backend(request).tasks.tasks.get(task_id)
    return view if view is not None and view.user == user_of(request) else None


async def get_task(request: Request) -> Response:
    view = task_of(request, request.path_params["task_id"])
    if view is None:
        raise HTTPException(404, "no such task")
    return JSONResponse(view.public())


async def get_order(request: Request) -> Response:
    """The order as order-write stored it, its invoice once there is one, and its task."""
    b = backend(request)
    order_id = request.path_params["order_id"]
    invoice_call = asyncio.ensure_future(b.invoices.call("for_order", order_id, **b.call_args()))
    try:
        order = await b.orders.call("status", order_id, **b.call_args())
    except BaseException:
        invoice_call.cancel()
        with contextlib.suppress(BaseException):
            await invoice_call
        raise
    body: dict[str, Any] = {"partial": False}
    try:
        body["invoice"] = await invoice_call
    except (RpcError, ConnectionLost) as exc:  # the order without its invoice, marked partial
        body.update(invoice=None, partial=True, missing={"invoice": _reason(exc)})
    view = task_of(request, order_id)
    if order is not None and order["user"] != user_of(request):
        order, body["invoice"] = None, None
    if order is None and view is None:
        raise HTTPException(404, "no such order")
    return JSONResponse({"order": order, **body, "task": view.public() if view else None})


async def list_orders(request: Request) -> Response:
    """The caller's orders, from the read side."""
    b = backend(request)
    entries = await b.history.call("orders_of", user_of(request), **b.call_args())
    return JSONResponse({"orders": entries})


# ---------------------------------------------------------------------- errors


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NoResponder):
        return "no server is running"
    if isinstance(exc, RpcTimeout):
        return "no answer in time"
    if isinstance(exc, RemoteError):
        return f"{exc.remote_type}: {exc.remote_message}"
    return type(exc).__name__


def _validation_text(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
    return "the body is not JSON"


def error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status_code=status,
                        headers=headers or None)  # fmt: skip


REFUSED_INPUT = {"ValueError", "ValidationError", "DecodeError", "TypeError"}


async def on_rpc_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, NoResponder):
        return error(503, "service_unavailable", f"no server answers on {_queue_of(exc)}")
    if isinstance(exc, RpcTimeout):
        return error(504, "service_timeout", "a service did not answer in time")
    if isinstance(exc, PublishError):  # the broker refused the request (a permission taken away, say)
        log.warning("the broker refused a request: %s", exc)
        return error(503, "service_unavailable", "the broker refused the request")
    if isinstance(exc, RemoteError):
        if exc.remote_type in REFUSED_INPUT:
            return error(422, "rejected", exc.remote_message)
        log.warning("a service failed: %s: %s", exc.remote_type, exc.remote_message)
        return error(502, "service_failed", "a service failed")
    return error(503, "service_unavailable", "the broker connection was lost")


def _queue_of(exc: BaseException) -> str:
    text = str(exc)
    for queue in (PRODUCTS_RPC, REVIEWS_RPC, CART_RPC, ORDERS_RPC, INVOICES_RPC, HISTORY_RPC):
        if queue.name in text:
            return queue.name
    return "a request queue"


async def on_unsendable(request: Request, exc: Exception) -> Response:
    # What the client sent cannot go into a request: a string with a lone surrogate, a value too large.
    if isinstance(exc, MessageTooLarge):
        return error(413, "too_large", "the request is too large to send on")
    return error(422, "invalid", str(exc))


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {
        401: "unauthenticated", 403: "forbidden", 404: "not_found", 422: "invalid", 405: "method_not_allowed",
        413: "too_large",
    }  # fmt: skip
    return error(exc.status_code, codes.get(exc.status_code, "error"), str(exc.detail))


async def on_any_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return error(500, "internal", "internal error")


# ---------------------------------------------------------------------- middleware


class Gatekeeper:
    """The request's id, log line and trace span; then the API key and the rate limit (an ASGI middleware).

    A plain ASGI middleware, not Starlette's ``BaseHTTPMiddleware``: that one
    runs the rest of each request in an anyio task group of its own and wraps
    the response in a stream, about a quarter of the gateway's CPU samples
    under the load run (py-spy). The request id (``X-Request-ID``, see
    :mod:`.correlation`) is current for everything the request runs, so every
    RPC call carries it and every log line made for it shows it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request = Request(scope)
        request_id = correlation.accept(request.headers.get(correlation.HTTP_HEADER))
        status = 500  # if the app fails before it answers (Starlette's outer error handler answers 500)
        with correlation.using(request_id), tracing.server_span(f"{request.method} {request.url.path}") as trace_id:

            async def send_marked(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    marked = MutableHeaders(scope=message)
                    marked["X-Trace-Id"] = trace_id
                    marked[correlation.HTTP_HEADER] = request_id
                await send(message)

            try:
                refusal = self._refusal(request)
                await (refusal or self.app)(scope, receive, send_marked)
            finally:
                log.info(
                    "%s %s %d %.1f ms trace_id=%s", request.method, request.url.path, status,
                    (time.perf_counter() - started) * 1000, trace_id,
                )  # fmt: skip

    @staticmethod
    def _refusal(request: Request) -> Response | None:
        """The 401, 403 or 429 answer for a request that may not go on; None (and its user noted) if it may."""
        if request.url.path in PUBLIC_PATHS or request.method == "OPTIONS":
            return None
        b = backend(request)
        key = request.headers.get("x-api-key")
        if not key:
            return error(401, "unauthenticated", "an API key is needed (header X-API-Key)")
        known = b.keys.get(key)
        if known is None:
            return error(403, "forbidden", "unknown API key")
        user, limiter = known
        wait = limiter.check(key)
        if wait is not None:
            return error(
                429, "rate_limited", f"more than {limiter.limit} requests in {limiter.window:g} s",
                **{"Retry-After": str(max(1, math.ceil(wait)))},
            )  # fmt: skip
        request.state.user = user
        return None


# ---------------------------------------------------------------------- the app


def parse_keys(text: str, default_limit: str) -> dict[str, tuple[str, RateLimiter]]:
    """``key:user[:limit/window],...`` -> {key: (user, its limiter)}."""
    keys: dict[str, tuple[str, RateLimiter]] = {}
    storage = MemoryStorage()  # one store for every key's counts
    for entry in text.split(","):
        key, _, rest = entry.strip().partition(":")
        user, _, limit = rest.partition(":")
        if key and user:
            keys[key] = (user, RateLimiter.from_text(limit or default_limit, storage))
    return keys


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    broker = Broker(BrokerSettings.from_env())
    await broker.connect()
    tasks = Tasks()

    async def on_task_event(event: TaskEvent) -> None:
        tasks.update(event)

    keys = parse_keys(os.environ.get("SHOP_API_KEYS") or DEMO_KEYS, os.environ.get("SHOP_RATE_LIMIT") or "100/60")
    try:
        async with contextlib.AsyncExitStack() as stack:
            queues = {"products": PRODUCTS_RPC, "reviews": REVIEWS_RPC, "cart": CART_RPC, "orders": ORDERS_RPC,
                      "invoices": INVOICES_RPC, "history": HISTORY_RPC}  # fmt: skip
            clients = {name: await stack.enter_async_context(RpcClient(broker, q.name)) for name, q in queues.items()}
            await stack.enter_async_context(
                Subscriber(broker, TASK_EVENTS_EXCHANGE, on_task_event, binding_keys=[f"{PLACE_ORDER_QUEUE}.*"])
            )
            app.state.backend = Backend(
                broker, **clients, tasks=tasks, cache=TtlCache(_env_float("SHOP_CACHE_TTL", 10)),
                keys=keys,
                timeout=_env_float("SHOP_RPC_TIMEOUT", 5), reviews_timeout=_env_float("SHOP_REVIEWS_TIMEOUT", 1),
            )  # fmt: skip
            log.info("gateway ready: %d API keys", len(keys))
            yield
    finally:
        await broker.close()


def make_app() -> Starlette:
    tracing.setup_tracing("gateway")
    origins = [o for o in (os.environ.get("SHOP_CORS_ORIGINS") or "http://localhost:3000").split(",") if o]
    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/products", list_products),
            Route("/products/{product_id}", get_product),
            Route("/cart/add", add_to_cart, methods=["POST"]),
            Route("/cart", get_cart),
            Route("/order/place", place_order, methods=["POST"]),
            Route("/tasks/{task_id}", get_task),
            Route("/orders", list_orders),
            Route("/orders/{order_id}", get_order),
        ],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=["X-API-Key", "Content-Type", "X-Request-ID"],
                expose_headers=["X-Cache", "X-Trace-Id", "X-Request-ID", "Retry-After"],
            ),
            Middleware(Gatekeeper),
        ],
        exception_handlers={
            RpcError: on_rpc_error,
            ConnectionLost: on_rpc_error,
            PublishError: on_rpc_error,
            InvalidMessage: on_unsendable,
            MessageTooLarge: on_unsendable,
            HTTPException: on_http_error,
            Exception: on_any_error,
        },
        lifespan=lifespan,
    )


app = make_app()


def main(argv: list[str] | None = None) -> int:
    """``python -m examples.shop gateway [--host H] [--port P] [--ssl-certfile F --ssl-keyfile F]``."""
    import uvicorn

    from amqpkit.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m examples.shop gateway", description="the shop's HTTP gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (else: TLS ends at a proxy)")
    parser.add_argument("--ssl-keyfile")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    args = parser.parse_args(argv)
    configure_logging(json_lines=args.log_json)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", access_log=False,
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
    )  # fmt: skip
    return 0
