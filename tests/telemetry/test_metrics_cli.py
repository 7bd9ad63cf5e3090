"""`amqpkit run --metrics-port P`: the service's metrics in Prometheus text while it serves."""

from __future__ import annotations

import asyncio
import signal
import urllib.request

import pytest

from amqpkit import Broker, RpcClient
from examples.billing import QuoteRequest

from ..brokerctl import free_port
from ..service.test_run_cli import Run
from ..waiting import until

pytestmark = pytest.mark.usefixtures("spawned")


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a local URL
            return str(response.read().decode())
    except OSError:
        return None


async def test_run_serves_metrics(amqp_url: str, broker: Broker) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    run = await Run.start("examples.billing:service", "--metrics-port", str(port), "--grace", "5",
                          env={"AMQP_URL": amqp_url})  # fmt: skip
    try:
        await run.until_err("service billing running")
        async with RpcClient(broker, "billing.rpc") as billing:
            for total in range(3):
                await billing.call("quote", QuoteRequest(total=total, country="NL"), timeout=10)
        text: list[str] = []

        async def counted() -> bool:
            got = await asyncio.to_thread(_get, url)
            text[:] = [got or ""]
            return any(
                line.startswith("messaging_client_consumed_messages") and 'subscription_name="billing.rpc"' in line
                and line.endswith(" 3.0")
                for line in (got or "").splitlines()
            )  # fmt: skip

        await until(counted, timeout=30)
        assert "messaging_process_duration_seconds_bucket" in text[0]
    finally:
        run.proc.send_signal(signal.SIGTERM)
        assert await run.exit() == 0, run.text()


async def test_metrics_port_with_processes_is_refused() -> None:
    run = await Run.start("examples.billing:service", "--metrics-port", str(free_port()), "--processes", "2",
                          env={})  # fmt: skip
    assert await run.exit() == 2
    assert any("--processes 1" in line for line in run.err), run.text()
