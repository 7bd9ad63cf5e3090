"""One trace across a gateway, an RPC call, an event and a retried task (amqpkit.telemetry; needs amqpkit[otel]).

``python -m examples.traced`` (from the checkout's root, broker from ``AMQP_URL``)
runs it once and draws the trace it exported; see patterns/observability.md.

The flow: a gateway span ``POST /orders`` calls ``place`` over RPC; the RPC
handler publishes ``order.placed``; a subscriber enqueues an invoice task; the
worker's first attempt fails (``Retry``) and the second succeeds. Every span
lands in one trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from amqpkit import (
    Broker,
    Exchange,
    Publisher,
    Queue,
    Retry,
    RetryPolicy,
    RpcClient,
    RpcServer,
    Subscriber,
    Worker,
    WorkQueue,
    telemetry,
)

log = logging.getLogger("examples.traced")

ORDERS = Exchange("traced.orders", type="topic")
RPC_QUEUE = "traced.rpc"
TASKS = "traced.invoices"


async def run_once(url: str, *, exporters: Sequence[SpanExporter] = ()) -> list[ReadableSpan]:
    """Run the flow once against the broker at ``url``; the spans it made (also sent to ``exporters``)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "traced-example"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for exporter in exporters:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.instrument(tracer_provider=provider)
    gateway = provider.get_tracer("examples.traced.gateway")
    invoiced = asyncio.Event()
    attempts = 0
    try:
        async with Broker(url) as broker:
            work: WorkQueue[dict[str, Any]] = WorkQueue(
                broker, TASKS, retry=RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0)
            )
            publisher: Publisher[dict[str, Any]] = Publisher(broker, ORDERS)
            server = RpcServer(broker, Queue(RPC_QUEUE, auto_delete=True))

            @server.method("place")
            async def place(order: dict[str, Any]) -> dict[str, Any]:
                log.info("placing order %s", order["id"])
                await publisher.publish(order, routing_key="order.placed")
                return {"accepted": order["id"]}

            async def on_order(order: dict[str, Any]) -> None:
                log.info("order %s placed: invoice it", order["id"])
                await work.enqueue(order)

            async def invoice(order: dict[str, Any]) -> None:
                nonlocal attempts
                attempts += 1
                log.info("invoicing order %s, attempt %d", order["id"], attempts)
                if attempts == 1:
                    raise Retry("the invoice printer was busy", delay=0.05)
                invoiced.set()

            try:
                async with (
                    server,
                    Subscriber(broker, ORDERS, on_order, binding_keys=["order.*"]),
                    Worker(work, invoice),
                    RpcClient(broker, RPC_QUEUE, timeout=30) as client,
                ):
                    with gateway.start_as_current_span("POST /orders", kind=SpanKind.SERVER):
                        log.info("gateway: new order")
                        await client.call("place", {"id": 42, "total": 99.5})
                    await asyncio.wait_for(invoiced.wait(), 30)
            finally:
                for queue in [TASKS, work.dlq_name, *(f"{TASKS}.retry.{ms}" for ms in work._delay_queues)]:
                    with contextlib.suppress(Exception):
                        await broker.delete_queue(queue)
                with contextlib.suppress(Exception):
                    await broker.delete_exchange(ORDERS.name)
    finally:
        telemetry.uninstrument()
        provider.shutdown()
    return list(memory.get_finished_spans())
