"""The shop end to end: real processes, the real broker (the plugin's vhost for this test), HTTP from outside.

Every service runs as ``amqpkit run examples.shop.<name>:service`` and the
gateway under uvicorn, started by the example's own launcher, in process
groups of their own; leaving the ``with`` block, however it is left (a
failed assert, pytest-timeout's signal), ends every one of them. The SQLite
files and each process's log go to ``tmp_path``; a failure prints the logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from amqpkit import Broker, Envelope, RpcClient, TaskEvent, TaskStatus
from examples.shop.common import EVENTS, HISTORY_RPC, ORDER_CREATED, HistoryStats, event_id
from examples.shop.draw import load, trace_of
from examples.shop.gateway import RateLimiter, Tasks, TtlCache, parse_keys
from examples.shop.launcher import ROOT, Landscape, running

ADA = {"X-API-Key": "demo-key-ada"}
CY = {"X-API-Key": "demo-key-cy"}  # limited to 5 requests a minute


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Call ``probe`` until it returns something true; that value. AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(0.2)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The JSON error body of a response that must have ``status``; never a traceback."""
    assert response.status_code == status, (response.status_code, response.text)
    assert "Traceback" not in response.text
    body: dict[str, Any] = response.json()["error"]
    assert body["status"] == status
    return body


def dump_logs(logs: Path) -> None:
    for path in sorted(logs.glob("*.log")):
        print(f"----- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))


async def _publish_again(url: str, order: dict[str, Any]) -> None:
    """The order's OrderCreated event once more, with its message id: what a relay resending it would do."""
    event = {k: order[k] for k in ("order_id", "user", "total", "items", "created_at")}
    async with Broker(url) as broker:
        await broker.publish(
            Envelope(json.dumps(event).encode(), content_type="application/json",
                     message_id=event_id(ORDER_CREATED, order["order_id"])),
            exchange=EVENTS.name, routing_key=ORDER_CREATED, mandatory=True,
        )  # fmt: skip


async def _history_stats(url: str) -> HistoryStats:
    async with Broker(url) as broker, RpcClient(broker, HISTORY_RPC.name) as history:
        return await history.call("stats", 0, returns=HistoryStats, timeout=10)


def rebuild(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "examples.shop", "rebuild"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_an_order_goes_through_every_service_and_the_read_model_replays(amqp_url: str, tmp_path: Path) -> None:
    started = time.monotonic()
    env = {
        "AMQP_URL": amqp_url,
        "SHOP_DATA": str(tmp_path / "data"),
        "SHOP_TRACES": str(tmp_path / "traces"),
        "SHOP_RPC_TIMEOUT": "3",
        "SHOP_CACHE_TTL": "300",
    }
    logs = tmp_path / "logs"
    try:
        with running(env, logs=logs, timeout=50) as shop, httpx.Client(base_url=shop.gateway_url, timeout=20) as http:
            check_flow(shop, http, env, amqp_url, logs)
        # Every process stopped cleanly on its one SIGTERM, within the grace. uvicorn, once it has shut down,
        # raises the signal it caught again, so the gateway ends "by SIGTERM" after a clean stop.
        codes = dict(shop.exit_codes)
        assert codes.pop("gateway") in (0, -signal.SIGTERM)
        assert codes == dict.fromkeys(codes, 0) and len(codes) == 8, shop.exit_codes  # 7 services, a second products
        assert "closed connection" in (logs / "gateway.log").read_text().splitlines()[-1]
    except BaseException:
        dump_logs(logs)
        raise
    print(f"shop end to end: {time.monotonic() - started:.1f} s")


def check_flow(shop: Landscape, http: httpx.Client, env: dict[str, str], amqp_url: str, logs: Path) -> None:
    # Authentication and the rate limit, before anything reaches a service.
    assert error_of(http.get("/cart"), 401)["code"] == "unauthenticated"
    assert error_of(http.get("/cart", headers={"X-API-Key": "nope"}), 403)["code"] == "forbidden"
    assert [http.get("/nowhere", headers=CY).status_code for _ in range(5)] == [404] * 5
    limited = http.get("/cart", headers=CY)
    error_of(limited, 429)
    assert 1 <= int(limited.headers["Retry-After"]) <= 60

    # Reads: the list, then a product aggregated with its reviews; the second read comes from the cache.
    first = http.get("/products", headers=ADA)
    assert first.status_code == 200 and first.json()["cached"] is False and first.headers["X-Cache"] == "miss"
    assert [p["id"] for p in first.json()["products"]] == ["p1", "p2", "p3", "p4"]
    assert http.get("/products", headers=ADA).json()["cached"] is True
    page = http.get("/products/p1", headers=ADA).json()
    assert page["partial"] is False and page["product"]["name"] == "espresso cup"
    assert {r["author"] for r in page["reviews"]} == {"ada", "bob"}
    assert http.get("/products/p1", headers=ADA).headers["X-Cache"] == "hit"
    error_of(http.get("/products/p9", headers=ADA), 404)
    error_of(http.post("/cart/add", headers=ADA, json={"product_id": "p1", "quantity": 0}), 422)

    # The order flow: cart, place (202 and a task), the task's status from its events, the invoice.
    http.post("/cart/add", headers=ADA, json={"product_id": "p1", "quantity": 2}).raise_for_status()
    cart = http.post("/cart/add", headers=ADA, json={"product_id": "p3"}).json()
    assert cart["total"] == pytest.approx(2 * 9.5 + 21.9)
    key = f"checkout-{uuid.uuid4().hex}"  # the client's Idempotency-Key: a retry of this request is this order
    placed = http.post("/order/place", headers={**ADA, "Idempotency-Key": key})
    assert placed.status_code == 202, placed.text
    order_id = placed.json()["order_id"]
    assert http.get("/cart", headers=ADA).json()["items"] == []
    # Sent again (its answer lost, or a 504): the same order, answered as the first time, not a second one and
    # not "the cart is empty". The key is the user's own: bob's request with it is not ada's order.
    again = http.post("/order/place", headers={**ADA, "Idempotency-Key": key})
    assert (again.status_code, again.json(), again.headers.get("Idempotent-Replayed")) == (202, placed.json(), "true")
    assert error_of(http.post("/order/place", headers={"X-API-Key": "demo-key-bob", "Idempotency-Key": key}), 422)
    for bad in (b"", b"k" * 256, "café".encode()):
        refused_key = http.post("/order/place", headers={b"X-API-Key": b"demo-key-ada", b"Idempotency-Key": bad})
        assert "Idempotency-Key" in error_of(refused_key, 422)["message"]
    task = wait_for(
        "the order task to finish",
        lambda: (t := http.get(f"/tasks/{order_id}", headers=ADA).json())["status"] in ("completed", "failed") and t,
    )
    assert task["status"] == "completed", task
    assert {"pending", "running", "completed"} <= set(task["history"])  # events of two connections: any order
    status = wait_for(
        "the invoice", lambda: (s := http.get(f"/orders/{order_id}", headers=ADA).json())["invoice"] and s
    )
    assert status["invoice"]["number"] == f"INV-{order_id}"
    assert status["invoice"]["total"] == status["order"]["total"] == pytest.approx(40.9)
    error_of(http.get(f"/orders/{order_id}", headers={"X-API-Key": "demo-key-bob"}), 404)  # not bob's

    # An order the order-manager refuses (out of stock): the task fails, with the reason.
    http.post("/cart/add", headers=ADA, json={"product_id": "p4"}).raise_for_status()
    # (The first order's key again, with something new in the cart: still that order, and the cart is left alone.)
    assert http.post("/order/place", headers={**ADA, "Idempotency-Key": key}).json() == placed.json()
    assert [i["product_id"] for i in http.get("/cart", headers=ADA).json()["items"]] == ["p4"]
    refused = http.post("/order/place", headers=ADA).json()["order_id"]
    failed = wait_for(
        "the refused task",
        lambda: (t := http.get(f"/tasks/{refused}", headers=ADA).json())["status"] in ("completed", "failed") and t,
    )
    assert failed["status"] == "failed" and "in stock" in failed["error"], failed

    # The read side, from events only: the order with its invoice, each event applied once.
    def history() -> list[dict[str, Any]]:
        orders: list[dict[str, Any]] = http.get("/orders", headers=ADA).json()["orders"]
        return orders

    before = wait_for("the read model", lambda: (h := history()) and h[0]["invoice"] and h)
    assert [(e["order_id"], e["invoice"], e["events"]) for e in before] == [(order_id, f"INV-{order_id}", 2)]

    # A redelivered event (same message id): absorbed by the inbox, not applied twice.
    duplicates = asyncio.run(_history_stats(amqp_url)).duplicates
    asyncio.run(_publish_again(amqp_url, before[0]))
    wait_for("the duplicate to be absorbed", lambda: asyncio.run(_history_stats(amqp_url)).duplicates > duplicates)
    assert history() == before

    # Replay: history stopped (the gateway answers 503 meanwhile), the model rebuilt from the stream, the same.
    shop.stop("history")
    # The broker deletes the auto-delete request queue as it sees the connection go: a moment after the exit.
    down = wait_for("a 503", lambda: (r := http.get("/orders", headers=ADA)).status_code == 503 and r, timeout=15)
    assert error_of(down, 503)["code"] == "service_unavailable"
    out = rebuild(env)
    assert "2 events applied, 1 duplicates skipped; 1 orders" in out, out
    shop.start("history")

    # Products and reviews down: 503 for what is not cached, a partial page without reviews.
    shop.stop("reviews", grace=2)
    shop.stop("products", grace=2)
    down = wait_for("a 503", lambda: (r := http.get("/products/p2", headers=ADA)).status_code == 503 and r, timeout=15)
    assert "shop.products" in error_of(down, 503)["message"]
    page = http.get("/products/p1", headers=ADA).json()
    assert page["partial"] is True and page["reviews"] is None and page["cached"] is True
    # A slow products service: 504 once the gateway's timeout (3 s) is past.
    shop.start("products", extra_env={"SHOP_PRODUCTS_DELAY": "5"})
    shop.wait_ready(["products", "history"])
    assert history() == before  # the rebuilt read model
    error_of(http.get("/products/p2", headers=ADA), 504)
    shop.stop("products", grace=0.5)
    # Back, with two products processes sharing the queue: the same requests answer again, from both.
    shop.start("products")
    shop.start("products-2")
    shop.start("reviews")
    shop.wait_ready(["products", "products-2", "reviews"])
    assert http.get("/products/p2", headers=ADA).json()["product"]["name"] == "moka pot"
    assert http.get("/products/p1", headers=ADA).json()["partial"] is False
    for n in range(6):  # not in the catalogue, so never cached: each is a call
        error_of(http.get(f"/products/x{n}", headers=ADA), 404)
    served = {name: (logs / f"{name}.log").read_text().count("product x") for name in ("products", "products-2")}
    assert all(served.values()), served  # competing consumers: both instances took requests

    # One trace from the HTTP request through RPC, the task and the events, across the processes.
    spans = trace_of(load(Path(env["SHOP_TRACES"])), order_id)
    assert len({s["trace_id"] for s in spans}) == 1
    seen = {(s["service"], s["name"]) for s in spans}
    for expected in [
        ("gateway", "POST /order/place"),
        ("orders", "shop.orders/place"),
        ("orders", "process shop.place-order"),
        ("invoices", "shop.invoices/create"),
        ("invoices", "process shop.create-invoice"),
        ("orders", "send shop.events"),
        ("invoices", "send shop.events"),
        ("history", "process shop.history.events"),
        ("notifications", "process shop.notifications"),
    ]:
        assert expected in seen, (expected, sorted(seen))

    # Invoices down for longer than the order-manager's retries lasted before (3.7 s: the task failed, its order
    # written and never invoiced until someone replayed it by hand; a hunt left 367 of 1,982 orders so): the
    # task keeps retrying, and completes with its invoice once invoices is back.
    bob = {"X-API-Key": "demo-key-bob"}
    shop.stop("invoices", grace=2)
    http.post("/cart/add", headers=bob, json={"product_id": "p2"}).raise_for_status()
    late = http.post("/order/place", headers=bob).json()["order_id"]
    wait_for("the order to be written", lambda: http.get(f"/orders/{late}", headers=bob).json().get("order"))
    time.sleep(8)  # the outage
    assert http.get(f"/tasks/{late}", headers=bob).json()["status"] not in ("failed", "completed")
    shop.start("invoices")
    task = wait_for(
        "the task to end",
        lambda: (t := http.get(f"/tasks/{late}", headers=bob).json())["status"] in ("completed", "failed") and t,
        timeout=60,
    )
    assert task["status"] == "completed", task
    assert http.get(f"/orders/{late}", headers=bob).json()["invoice"]["number"] == f"INV-{late}"


def test_a_request_id_reaches_every_service_without_tracing(amqp_url: str, tmp_path: Path) -> None:
    """X-Request-ID travels in a header of every message the request causes and shows in each service's lines."""
    started = time.monotonic()
    env = {"AMQP_URL": amqp_url, "SHOP_DATA": str(tmp_path / "data"), "SHOP_RPC_TIMEOUT": "5"}  # no SHOP_TRACES
    logs = tmp_path / "logs"
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    mine = {**ADA, "X-Request-ID": request_id}
    try:
        with running(env, logs=logs, timeout=50) as shop, httpx.Client(base_url=shop.gateway_url, timeout=20) as http:
            added = http.post("/cart/add", headers=mine, json={"product_id": "p2"})  # products get, cart add
            assert added.status_code == 200 and added.headers["X-Request-ID"] == request_id
            placed = http.post("/order/place", headers=mine)  # cart get, orders place, cart clear, and all after
            assert placed.status_code == 202 and placed.headers["X-Request-ID"] == request_id
            order_id = placed.json()["order_id"]
            services = ("gateway", "products", "cart", "orders", "invoices", "history", "notifications")

            def lines_of(name: str) -> list[str]:
                return [
                    line
                    for line in (logs / f"{name}.log").read_text().splitlines()
                    if f"request_id={request_id}" in line
                ]

            wait_for("the id in every service's log", lambda: all(len(lines_of(n)) >= 2 for n in services))
            for name in ("orders", "invoices", "history", "notifications"):  # each line about the order has the id
                about = [line for line in (logs / f"{name}.log").read_text().splitlines() if order_id in line]
                assert about and all(f"request_id={request_id}" in line for line in about), (name, about)
            # No id, or one that is not sane (it would go into log lines as it is): the gateway makes one.
            for sent in ({}, {"X-Request-ID": "two words"}, {"X-Request-ID": "x" * 65}):
                made = http.get("/cart", headers={**ADA, **sent}).headers["X-Request-ID"]
                assert len(made) == 32 and made != request_id and int(made, 16) >= 0
        assert not (tmp_path / "traces").exists() and "trace_id=" in lines_of("gateway")[0]
    except BaseException:
        dump_logs(logs)
        raise
    print(f"request id across the shop: {time.monotonic() - started:.1f} s")


# ---------------------------------------------------------------------- the gateway's own parts, without a broker


def test_the_rate_limit_is_a_moving_window_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]  # the wall clock limits' memory storage reads, and the gateway's Retry-After with it
    monkeypatch.setattr(time, "time", lambda: clock[0])

    def at(t: float, key: str = "k") -> float | None:
        clock[0] = 1000.0 + t
        return limiter.check(key)

    limiter = RateLimiter(3, 60)
    assert [at(t) for t in (0, 1, 2)] == [None, None, None]
    assert at(30) == pytest.approx(30)  # the oldest of the three leaves the window at 60
    assert at(30, "other") is None  # each key counts alone
    assert at(60.5) is None  # 0 is out of the window now
    assert at(60.6) == pytest.approx(0.4)  # 1 is the oldest in it: it leaves at 61


def test_keys_carry_their_user_and_limit() -> None:
    keys = parse_keys("a:ada,b:bob:5/10, bad ,c:", "100/60")
    assert sorted(keys) == ["a", "b"]
    user, limiter = keys["b"]
    assert (user, limiter.limit, limiter.window) == ("bob", 5, 10)
    assert (keys["a"][1].limit, keys["a"][1].window) == (100, 60)


def test_a_task_status_never_goes_back_but_a_replayed_failure_runs_again() -> None:
    def event(status: TaskStatus, error: str | None = None) -> TaskEvent:
        return TaskEvent(task_id="t1", queue="q", status=status, attempt=1, timestamp=datetime.now(UTC), error=error)

    tasks = Tasks()
    tasks.update(event(TaskStatus.RUNNING))  # before the gateway knew of the task (its RPC answer came later)
    view = tasks.placed("t1", "ada")
    assert view.status == "running"
    late_pending = event(TaskStatus.PENDING)
    tasks.update(event(TaskStatus.RETRYING))
    assert view.status == "running"
    failed = event(TaskStatus.DEAD_LETTERED, "no invoices")
    tasks.update(failed)
    tasks.update(late_pending)  # stamped before the failure: ignored
    assert (view.status, view.error) == ("failed", "no invoices")
    tasks.update(event(TaskStatus.RUNNING))  # replayed from the dead-letter queue
    tasks.update(event(TaskStatus.COMPLETED))
    assert (view.status, view.error) == ("completed", None)
    tasks.update(event(TaskStatus.DEAD_LETTERED, "late"))  # completed is final
    assert view.status == "completed"
    assert view.history == ["running", "retrying", "dead_lettered", "pending", "running", "completed", "dead_lettered"]


def test_the_cache_forgets_after_its_ttl() -> None:
    cache = TtlCache(0.05)
    cache.put("k", 1)
    assert cache.get("k") == 1
    time.sleep(0.06)
    assert cache.get("k") is None
    TtlCache(0).put("k", 1)  # a TTL of 0 caches nothing
