"""Switching instrumentation on and off; the core without OpenTelemetry; metrics in Prometheus text."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from typing import Any

from opentelemetry.trace import SpanKind

from amqpkit import Broker, BrokerSettings, Delivery, Envelope, Queue, RpcClient, RpcServer, _hooks, telemetry

from ..waiting import wait_for
from .conftest import Telemetry


def test_core_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, amqpkit, amqpkit.patterns, amqpkit.cli, amqpkit.service\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
        "from amqpkit import _hooks\n"
        "assert _hooks.publish is None and _hooks.consume is None and _hooks.rpc_call is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_uninstrumented_messages_carry_no_context(broker: Broker, name: str) -> None:
    telemetry.instrument()
    assert _hooks.publish is not None and telemetry.instrumented()
    telemetry.uninstrument()
    assert _hooks.publish is None and _hooks.consume is None and not telemetry.instrumented()
    queue = Queue(f"{name}.q", auto_delete=True)
    seen: list[Delivery[bytes]] = []

    async def on_message(delivery: Delivery[bytes]) -> None:
        seen.append(delivery)
        await delivery.ack()

    consumer = await broker.consume(queue, on_message)
    try:
        await broker.publish(Envelope(b"x"), routing_key=queue.name)
        await wait_for(lambda: seen)
    finally:
        await consumer.cancel()
    assert "traceparent" not in seen[0].headers


async def test_metrics_in_prometheus_text(broker: Broker, name: str) -> None:
    server = telemetry.serve_metrics(0)
    try:
        queue = Queue(f"{name}.q", auto_delete=True)
        await broker.declare_queue(queue)
        await broker.publish(Envelope(b"x"), routing_key=queue.name)
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(server.url, timeout=10).read().decode())  # noqa: S310
    finally:
        server.close()
    assert not telemetry.instrumented()
    line = next(line for line in text.splitlines() if line.startswith("messaging_client_sent_messages"))
    assert 'messaging_system="rabbitmq"' in line and line.endswith(" 1.0")


async def test_an_override_of_publish_or_call_runs_once_per_call(
    settings: BrokerSettings, name: str, otel: Telemetry
) -> None:
    """A subclass's own ``publish`` (or ``call``) runs once for each call, instrumented as not: the hooks send
    through the core, not through the public method again."""
    calls: list[str] = []

    class CountingBroker(Broker):
        async def publish(self, envelope: Envelope, **kwargs: Any) -> None:
            calls.append("publish")
            await super().publish(envelope, **kwargs)

    class CountingClient(RpcClient):
        async def call(self, method: str | None, payload: Any = None, **kwargs: Any) -> Any:
            calls.append("call")
            return await super().call(method, payload, **kwargs)

    queue = Queue(f"{name}.q", auto_delete=True)
    async with CountingBroker(settings) as broker:
        await broker.declare_queue(queue)
        await broker.publish(Envelope(b"x"), routing_key=queue.name)
        assert calls == ["publish"]
        server = RpcServer(broker, Queue(f"{name}.rpc", auto_delete=True))

        @server.method("echo")
        async def echo(value: int) -> int:
            return value

        async with server, CountingClient(broker, f"{name}.rpc", timeout=30) as client:
            assert await client.call("echo", 7, returns=int) == 7
        assert calls.count("call") == 1
        await broker.delete_queue(queue.name)
    assert len(otel.named(f"send {queue.name}")) == 1
    assert len([s for s in otel.spans() if s.kind is SpanKind.CLIENT]) == 1
