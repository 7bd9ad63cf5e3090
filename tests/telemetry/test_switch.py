"""Switching instrumentation on and off; the core without OpenTelemetry; metrics in Prometheus text."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request

from amqpkit import Broker, Delivery, Queue, _hooks, telemetry

from ..waiting import wait_for


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
        from amqpkit import Envelope

        await broker.publish(Envelope(b"x"), routing_key=queue.name)
        await wait_for(lambda: seen)
    finally:
        await consumer.cancel()
    assert "traceparent" not in seen[0].headers


async def test_metrics_in_prometheus_text(broker: Broker, name: str) -> None:
    server = telemetry.serve_metrics(0)
    try:
        from amqpkit import Envelope

        queue = Queue(f"{name}.q", auto_delete=True)
        await broker.declare_queue(queue)
        await broker.publish(Envelope(b"x"), routing_key=queue.name)
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(server.url, timeout=10).read().decode())  # noqa: S310
    finally:
        server.close()
    assert not telemetry.instrumented()
    line = next(line for line in text.splitlines() if line.startswith("messaging_client_sent_messages"))
    assert 'messaging_system="rabbitmq"' in line and line.endswith(" 1.0")
