"""Switching instrumentation on and off; the core without OpenTelemetry; metrics in Prometheus text."""

from __future__ import annotations

import asyncio
import os
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


_EARLY_INSTRUMENT = """
import asyncio
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from amqpkit import Broker, Delivery, Envelope, Queue, telemetry
from amqpkit.telemetry import hooks


async def main() -> None:
    telemetry.instrument()  # before the application has set its tracer provider
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    seen: list[Delivery[bytes]] = []

    async def on_message(delivery: Delivery[bytes]) -> None:
        seen.append(delivery)
        await delivery.ack()

    async with Broker() as broker:
        queue = Queue("early.q", auto_delete=True)
        consumer = await broker.consume(queue, on_message)
        await broker.publish(Envelope(b"before"), routing_key=queue.name)  # no provider yet: nothing recorded
        while len(seen) < 1:
            await asyncio.sleep(0.01)
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        for n in range(3):
            await broker.publish(Envelope(b"after"), routing_key=queue.name)
        while len(seen) < 4:
            await asyncio.sleep(0.01)
        await consumer.cancel()
    spans = exporter.get_finished_spans()
    kinds = sorted(span.kind.name for span in spans)
    assert kinds == ["CONSUMER"] * 3 + ["PRODUCER"] * 3, kinds
    producers = {span.context.span_id for span in spans if span.kind.name == "PRODUCER"}
    assert {span.parent.span_id for span in spans if span.kind.name == "CONSUMER"} == producers
    # the provider's own tracer is in use now, as if instrument() had come after it: lean spans, and no span
    # asked for under an unsampled parent
    assert {type(span).__name__ for span in spans} == {"LeanSpan"}, {type(span).__name__ for span in spans}
    assert hooks.current is not None and hooks.current.drops_unsampled
    # and the handler durations go into the meter provider's histogram as a run, not one record() each
    data = reader.get_metrics_data()
    counts = [point.count for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
              if m.name == "messaging.process.duration" for point in m.data.data_points]
    assert sum(counts) >= 3, counts
    assert hooks.current.process_duration.lean is not None
    print("ok")


asyncio.run(main())
"""


def test_instrumenting_before_the_provider_is_set_uses_it_once_set(amqp_url: str) -> None:
    """``instrument()`` with the global providers, called before the application sets them (at import time, say):
    spans and durations go through OpenTelemetry's proxies until then, and the providers' own tracer and histogram
    after."""
    done = subprocess.run([sys.executable, "-c", _EARLY_INSTRUMENT], env={**os.environ, "AMQP_URL": amqp_url},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
