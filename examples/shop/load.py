"""``python -m examples.shop.load``: a load run against the whole shop, on this machine only.

Starts every service and the gateway (the launcher, as ``all`` does, on the
broker of ``AMQP_URL`` and a fresh data folder), then runs ``--clients``
concurrent HTTP clients (httpx, a client and a connection each) for ``--seconds``:
mixed product reads, cart additions, history reads and orders. Each client
has an API key of its own with a limit high enough not to be throttled.
Prints, per route, requests/s, p50 and p99 latency and errors; then how many
orders went from pending to completed, and how long that took (from the
task's status events, as ``GET /tasks/{id}`` reports them). Every process
it started is ended at the end. Bounded in time: it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import ssl
import statistics
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from .launcher import running

PRODUCTS = ["p1", "p2", "p3"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Recorder:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.orders: list[tuple[str, str]] = []  # (api key, order id)
        self.cpu: dict[str, float] = {}  # CPU seconds each process used while the clients ran

    async def call(self, http: httpx.AsyncClient, method: str, route: str, url: str, key: str, **kw: Any) -> Any:
        started = time.perf_counter()
        try:
            response = await http.request(method, url, headers={"X-API-Key": key}, **kw)
            status = response.status_code
        except httpx.HTTPError:
            response, status = None, 0
        self.latency[route].append(time.perf_counter() - started)
        if status >= 400 or status == 0:
            self.errors[route][status] += 1
            return None
        return response.json() if response is not None else None


async def client(http: httpx.AsyncClient, rec: Recorder, key: str, until: float, rng: random.Random) -> None:
    while time.monotonic() < until:
        roll = rng.random()
        if roll < 0.45:
            await rec.call(http, "GET", "GET /products/{id}", f"/products/{rng.choice(PRODUCTS)}", key)
        elif roll < 0.65:
            await rec.call(http, "GET", "GET /products", "/products", key)
        elif roll < 0.80:
            await rec.call(http, "GET", "GET /orders", "/orders", key)
        else:
            added = await rec.call(http, "POST", "POST /cart/add", "/cart/add", key,
                                   json={"product_id": rng.choice(PRODUCTS), "quantity": 1})  # fmt: skip
            if added is not None and roll >= 0.9:
                placed = await rec.call(http, "POST", "POST /order/place", "/order/place", key)
                if placed is not None:
                    rec.orders.append((key, placed["order_id"]))


async def settle(http: httpx.AsyncClient, rec: Recorder, timeout: float) -> list[dict[str, Any]]:
    """Each order's task once it is completed or failed (or as it is when ``timeout`` runs out)."""
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    while len(done) < len(rec.orders) and time.monotonic() < deadline:
        for key, order_id in rec.orders:
            if order_id in done:
                continue
            answer = await http.get(f"/tasks/{order_id}", headers={"X-API-Key": key})
            task = answer.json()
            if task.get("status") in ("completed", "failed"):
                done[order_id] = task
        await asyncio.sleep(0.5)
    return list(done.values())


async def run(
    base_url: str, keys: list[str], seconds: float, rec: Recorder, pids: dict[str, int]
) -> list[dict[str, Any]]:
    """Each client with an HTTP client (one keep-alive connection) of its own, as separate users would have.

    One ``httpx.AsyncClient`` with a pool of 200 connections for all of them
    made the load generator the bottleneck: httpcore walks every connection
    of its pool (``has_expired``, ``is_idle``, a ``getpeername`` each) when a
    request starts and ends, so its CPU per request grew with the pool, and
    it measured its own queue (py-spy: 63 % of its samples in the pool).
    """
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()  # made once: httpx builds one per client otherwise (~50 ms of CPU each)
    async with contextlib.AsyncExitStack() as stack:
        https = [await stack.enter_async_context(
            httpx.AsyncClient(base_url=base_url, timeout=30, limits=one, verify=tls)) for _ in keys]  # fmt: skip
        until = time.monotonic() + seconds
        cpu_before = cpu_of(pids)
        await asyncio.gather(*(client(https[i], rec, key, until, random.Random(i)) for i, key in enumerate(keys)))
        cpu_after = cpu_of(pids)
        rec.cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_before if name in cpu_after}
        return await settle(https[0], rec, timeout=120)


def report(rec: Recorder, tasks: list[dict[str, Any]], seconds: float) -> str:
    lines = [f"{'route':<20} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}  errors"]
    for route in sorted(rec.latency):
        values = rec.latency[route]
        errors = ", ".join(f"{code or 'no answer'}: {n}" for code, n in sorted(rec.errors[route].items())) or "0"
        lines.append(
            f"{route:<20} {len(values):>8} {len(values) / seconds:>7.1f} {percentile(values, 0.5) * 1000:>8.1f} "
            f"{percentile(values, 0.99) * 1000:>8.1f}  {errors}"
        )
    total = sum(len(v) for v in rec.latency.values())
    lines.append(f"{'all':<20} {total:>8} {total / seconds:>7.1f}")
    completed = [t for t in tasks if t["status"] == "completed"]
    waits = [
        (datetime.fromisoformat(times["completed"]) - datetime.fromisoformat(times["pending"])).total_seconds()
        for times in (t["times"] for t in completed)
        if "pending" in times and "completed" in times
    ]
    lines.append(f"orders placed {len(rec.orders)}, completed {len(completed)}, "
                 f"failed {sum(t['status'] == 'failed' for t in tasks)}, "
                 f"unfinished {len(rec.orders) - len(tasks)}")  # fmt: skip
    if waits:
        lines.append(
            f"pending -> completed: p50 {statistics.median(waits) * 1000:.0f} ms, "
            f"p99 {percentile(waits, 0.99) * 1000:.0f} ms, max {max(waits) * 1000:.0f} ms"
        )
    return "\n".join(lines)


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each process has used so far, from /proc (Linux; empty elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    used: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        used[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return used


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.shop.load", description=__doc__)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--products", type=int, default=2, help="products processes")
    args = parser.parse_args()
    keys = [f"load-key-{i}" for i in range(args.clients)]
    data = tempfile.mkdtemp(prefix="shop-load-")
    env = {
        "SHOP_DATA": data,
        "SHOP_API_KEYS": ",".join(f"{k}:load{i}:1000000/60" for i, k in enumerate(keys)),
        "SHOP_RPC_TIMEOUT": "10",
    }
    rec = Recorder()
    with running(env, logs=Path(data) / "logs", products=args.products, timeout=120) as shop:
        pids = {name: proc.popen.pid for name, proc in shop.procs.items()} | {"load generator": os.getpid()}
        load_before = os.getloadavg()
        tasks = asyncio.run(run(shop.gateway_url, keys, args.seconds, rec, pids))
        load_after = os.getloadavg()
    print(f"{args.clients} clients for {args.seconds:g} s, {args.products} products processes; "
          f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min)")  # fmt: skip
    print(report(rec, tasks, args.seconds))
    if rec.cpu:
        used = sorted(rec.cpu.items(), key=lambda kv: -kv[1])
        print(f"CPU seconds while the clients ran: {', '.join(f'{name} {cpu:.1f}' for name, cpu in used)}")
    print(f"logs and databases in {data}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
