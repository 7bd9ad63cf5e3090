"""`amqpkit run MODULE:ATTR`: the example service under the CLI, probed on /readyz, through a cut, stopped by SIGTERM.

The service reaches the broker through the fault proxy, which cuts or refuses
only that process's connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from amqpkit import Broker, Publisher, Queue, RpcClient
from examples.billing import Invoice, OrderPlaced, QuoteRequest, orders

from .. import processes
from ..brokerctl import free_port
from ..reliability.proxy import FaultProxy, proxied_url
from ..waiting import until

pytestmark = pytest.mark.usefixtures("spawned")  # every process a test starts is ended, whatever the outcome

ROOT = Path(__file__).resolve().parents[2]
BILLING_QUEUES = ("billing.orders", "billing.invoices", "billing.invoices.dlq", "billing.rpc")


class Run:
    """``amqpkit run ...`` as a subprocess; both pipes drained all along (a full pipe would stall it)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            asyncio.ensure_future(self._drain(proc.stdout, self.out)),
            asyncio.ensure_future(self._drain(proc.stderr, self.err)),
        ]

    @classmethod
    async def start(cls, *args: str, env: dict[str, str]) -> Run:
        proc = await processes.spawn(
            sys.executable, "-m", "amqpkit.cli", "run", *args, cwd=ROOT, env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(proc)

    @staticmethod
    async def _drain(stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        async for line in stream:
            into.append(line.decode().rstrip())

    async def exit(self, timeout: float = 60) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._readers)
        return code

    async def until_err(self, text: str, timeout: float = 30) -> None:
        async def seen() -> bool:
            assert self.proc.returncode is None or any(text in line for line in self.err), self.text()
            return any(text in line for line in self.err)

        await until(seen, timeout=timeout)

    def text(self) -> str:
        return "\n".join(["-- stdout", *self.out, "-- stderr", *self.err])


async def http_get(port: int, path: str) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def probe(port: int, path: str = "/readyz") -> tuple[int, dict[str, object]] | None:
    try:
        return await http_get(port, path)
    except OSError:
        return None


async def until_status(port: int, status: int, timeout: float = 30) -> dict[str, object]:
    seen: list[dict[str, object]] = []

    async def check() -> bool:
        got = await probe(port)
        if got is not None and got[0] == status:
            seen.append(got[1])
            return True
        return False

    await until(check, timeout=timeout)
    return seen[-1]


@pytest.fixture
async def billing_cleanup(broker: Broker) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for q in BILLING_QUEUES:
            await broker.delete_queue(q)
        for x in ("shop.orders", "shop.invoices"):
            await broker.delete_exchange(x)


@pytest.mark.usefixtures("billing_cleanup")
async def test_the_example_runs_is_ready_survives_a_cut_and_stops_on_sigterm(
    proxy: FaultProxy, amqp_url: str, broker: Broker
) -> None:
    port = free_port()
    run = await Run.start("examples.billing:service", "--health-port", str(port), "--grace", "5",
                          env={"AMQP_URL": proxied_url(proxy, amqp_url)})  # fmt: skip
    assert await until_status(port, 200) == {"status": "ready"}
    assert await http_get(port, "/healthz") == (200, {"status": "ok"})
    await run.until_err("service billing running")

    # The broker goes away: not ready, with the reason; it comes back: ready again, every consumer with it.
    proxy.refusing = True
    proxy.cut()
    body = await until_status(port, 503)
    assert body["status"] == "not ready" and "not connected" in str(body["reason"]), body
    assert (await http_get(port, "/healthz"))[0] == 200  # alive all the while
    proxy.refusing = False
    await until_status(port, 200)

    async with RpcClient(broker, "billing.rpc") as billing:
        quote = await billing.call("quote", QuoteRequest(total=100, country="NL"), timeout=10)
        assert quote == {"net": 100.0, "tax": 21.0, "gross": 121.0}
        order = OrderPlaced(order_id=5, customer="c", total=10)
        await Publisher(broker, orders).publish(order, routing_key="order.placed")

        async def invoiced() -> bool:
            return (
                await billing.call("invoice_for", 5, returns=cast("type[Invoice | None]", Invoice | None), timeout=10)
                is not None
            )

        await until(invoiced, timeout=30)

    run.proc.send_signal(signal.SIGTERM)
    assert await run.exit() == 0, run.text()
    assert run.err[-1] == "service billing stopped", run.text()
    assert any("reconnected" in line for line in run.out), run.text()
    assert not any("Traceback" in line for line in run.out + run.err), run.text()


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("tests.service.no_such_module:svc", "cannot import 'tests.service.no_such_module'"),
        ("tests.service.apps:missing", "has no 'missing'"),
        ("tests.service.apps:not_a_service", "is a object, not an amqpkit Service"),
        ("tests.service.apps", "expected MODULE:ATTR"),
        ("tests.service.apps:conflicting", "both consume queue"),
        ("tests.service.apps:unresolvable", "annotation cannot be resolved"),
        (
            "tests.service.refused_app:svc",
            "tests.service.refused_app: worker tests.service.refused_app:crunch runs in "
            "pool processes (executor='process'): it cannot be given ctx (ServiceContext)",
        ),
    ],
)
async def test_bad_input_is_one_line_and_exit_2(target: str, says: str) -> None:
    run = await Run.start(target, env={"AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"})
    assert await run.exit() == 2, run.text()
    assert len(run.err) == 1 and run.err[0].startswith("error: ") and says in run.err[0], run.text()


async def test_a_worker_queue_that_cannot_be_restored_exits_1_with_the_reason(
    proxy: FaultProxy, amqp_url: str, broker: Broker, name: str
) -> None:
    run = await Run.start("tests.service.apps:workers", "--grace", "1",
                          env={"AMQP_URL": proxied_url(proxy, amqp_url), "SVC_PREFIX": name})  # fmt: skip
    try:
        await run.until_err("service workers running")
        proxy.stall()  # the service hears of the deletion only once the other queue is in place
        await broker.delete_queue(f"{name}.jobs")
        await broker.declare_queue(Queue(f"{name}.jobs", durable=True))  # classic, where the worker wants quorum
        proxy.cut()
        assert await run.exit() == 1, run.text()
        last = run.err[-1]
        assert last.startswith("error: service workers stopped: ") and f"{name}.jobs" in last, run.text()
        assert "PRECONDITION_FAILED" in last, run.text()
    finally:
        await broker.delete_queue(f"{name}.jobs")
        await broker.delete_queue(f"{name}.jobs.dlq")


async def test_an_unreachable_broker_exits_1_after_give_up_after(
    proxy: FaultProxy, amqp_url: str, broker: Broker, name: str
) -> None:
    run = await Run.start("tests.service.apps:workers", "--give-up-after", "2", "--log-json",
                          env={"AMQP_URL": proxied_url(proxy, amqp_url), "SVC_PREFIX": name})  # fmt: skip
    try:
        await run.until_err("service workers running")
        proxy.refusing = True
        proxy.cut()
        assert await run.exit() == 1, run.text()
        assert "unreachable for 2 s" in run.err[-1], run.text()
        records = [json.loads(line) for line in run.out]  # --log-json: every stdout line is one JSON object
        assert any(r["level"] == "error" and "unreachable" in r["message"] for r in records), run.text()
    finally:
        await broker.delete_queue(f"{name}.jobs")
        await broker.delete_queue(f"{name}.jobs.dlq")


@pytest.mark.usefixtures("billing_cleanup")
async def test_processes_n_runs_n_copies_ready_together(amqp_url: str, broker: Broker) -> None:
    port = free_port()
    run = await Run.start("examples.billing:service", "--processes", "2", "--health-port", str(port), "--grace", "5",
                          env={"AMQP_URL": amqp_url})  # fmt: skip
    await until_status(port, 200)

    async def two_consumers() -> bool:
        return (await broker.queue_counts("billing.rpc"))[1] == 2

    await until(two_consumers, timeout=30)
    async with RpcClient(broker, "billing.rpc") as billing:
        for total in range(10):
            assert (await billing.call("quote", QuoteRequest(total=total, country="XX"), timeout=10))["gross"] == total
    run.proc.send_signal(signal.SIGTERM)
    assert await run.exit() == 0, run.text()
    assert sum("service billing stopped" in line for line in run.err) == 2, run.text()
