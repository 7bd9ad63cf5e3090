"""What instrumentation does per message: how many spans and histogram measurements a one-way message and an RPC
call make, and that a context the sampler already dropped makes none at all and still travels."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiormq
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanContext, SpanKind
from pamqp.commands import Basic

from amqpkit import Broker, Delivery, Envelope, Queue, RpcClient, RpcServer, telemetry
from amqpkit.telemetry import hooks

from ..waiting import wait_for
from .conftest import Telemetry, instrumented


class _Counting:
    """A tracer that counts the spans amqpkit asks it for, by kind."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.child: Any = None
        self.started: list[SpanKind] = []

    def start_span(self, name: str, context: Any = None, kind: SpanKind = SpanKind.INTERNAL, *args: Any,
                   **kwargs: Any) -> Any:  # fmt: skip
        self.started.append(kind)
        return self.tracer.start_span(name, context, kind, *args, **kwargs)

    def start_child(self, name: str, parent: SpanContext | None, kind: SpanKind, *args: Any) -> Any:
        self.started.append(kind)
        return self.child(name, parent, kind, *args)


def _counting() -> _Counting:
    """Counts both ways the hooks start spans: the tracer's ``start_span``, and ``start_child`` for deliveries."""
    state = hooks.current
    assert state is not None
    counting = _Counting(state.tracer)
    counting.child = state.start_child
    state.tracer = counting
    state.start_child = counting.start_child
    return counting


@pytest.fixture
def sampled_out() -> Iterator[Telemetry]:
    """Instrumented with ParentBased(ALWAYS_OFF): a trace's root is dropped, and so is everything under it."""
    yield from instrumented(ParentBased(ALWAYS_OFF))


async def test_a_one_way_message_makes_two_spans_and_one_measurement(
    broker: Broker, name: str, otel: Telemetry
) -> None:
    counting = _counting()
    queue = Queue(f"{name}.q", auto_delete=True)
    seen: list[Delivery[bytes]] = []

    async def on_message(delivery: Delivery[bytes]) -> None:
        seen.append(delivery)
        await delivery.ack()

    consumer = await broker.consume(queue, on_message)
    try:
        for n in range(3):
            await broker.publish(Envelope(b"x" * n), routing_key=queue.name)
        await wait_for(lambda: len(seen) == 3 and len(otel.spans()) == 6)
    finally:
        await consumer.cancel()

    assert Counter(counting.started) == {SpanKind.PRODUCER: 3, SpanKind.CONSUMER: 3}
    assert Counter(s.kind for s in otel.spans()) == Counter(counting.started)
    assert otel.total("messaging.process.duration") == 3  # one histogram measurement per delivery
    assert otel.metric("amqpkit.rpc.client.duration") == []


@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
async def test_an_rpc_call_makes_a_client_and_a_server_span_only(
    broker: Broker, name: str, otel: Telemetry, reply_queue: str
) -> None:
    counting = _counting()
    server = RpcServer(broker, Queue(name, auto_delete=True))

    @server.method("echo")
    async def echo(payload: str) -> str:
        return payload

    async with server, RpcClient(broker, name, reply_queue=reply_queue, timeout=30) as client:  # type: ignore[arg-type]
        for n in range(3):
            assert await client.call("echo", str(n), returns=str) == str(n)
        await wait_for(lambda: len(otel.spans()) == 6)

    # The CLIENT span covers the request's publish (no PRODUCER span), the reply ends it (no CONSUMER span).
    assert Counter(counting.started) == {SpanKind.CLIENT: 3, SpanKind.SERVER: 3}
    assert Counter(s.kind for s in otel.spans()) == Counter(counting.started)
    assert otel.total("amqpkit.rpc.client.duration") == 3  # the caller's measurement
    assert otel.total("messaging.process.duration") == 3  # the server's handler


async def test_an_unsampled_context_makes_no_span_and_still_travels(
    broker: Broker, name: str, sampled_out: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    """A publish whose trace was dropped at the root: the consumer, what its handler publishes, the RPC call it
    makes and the server's handler make no span, and every one of them runs in that trace."""
    counting = _counting()
    first, second = Queue(f"{name}.first", auto_delete=True), Queue(f"{name}.second", auto_delete=True)
    contexts: dict[str, SpanContext] = {}
    headers: dict[str, Any] = {}
    handler_log = logging.getLogger("test.telemetry.unsampled")
    server = RpcServer(broker, Queue(f"{name}.rpc", auto_delete=True))

    @server.method("echo")
    async def echo(payload: str) -> str:
        contexts["server"] = trace.get_current_span().get_span_context()
        return payload

    async def on_first(delivery: Delivery[bytes]) -> None:
        contexts["first"] = trace.get_current_span().get_span_context()
        headers["first"] = delivery.headers["traceparent"]
        handler_log.warning("handling the first")
        assert await client.call("echo", "hi", returns=str) == "hi"
        await broker.publish(Envelope(b"next"), routing_key=second.name)
        await delivery.ack()

    async def on_second(delivery: Delivery[bytes]) -> None:
        contexts["second"] = trace.get_current_span().get_span_context()
        headers["second"] = delivery.headers["traceparent"]
        await delivery.ack()

    async with server, RpcClient(broker, f"{name}.rpc", timeout=30) as client:
        consumers = [await broker.consume(first, on_first), await broker.consume(second, on_second)]
        try:
            with caplog.at_level(logging.WARNING, logger="test.telemetry.unsampled"):
                await broker.publish(Envelope(b"start"), routing_key=first.name)
                await wait_for(lambda: "second" in contexts and sampled_out.total("amqpkit.messages.acked") == 3)
        finally:
            for consumer in consumers:
                await consumer.cancel()

    assert counting.started == [SpanKind.PRODUCER]  # only the root, which the sampler dropped
    assert sampled_out.spans() == []
    trace_ids = {c.trace_id for c in contexts.values()}
    assert len(trace_ids) == 1 and all(c.is_valid and not c.trace_flags.sampled for c in contexts.values())
    for traceparent in headers.values():
        _, trace_id, _, flags = str(traceparent).split("-")
        assert int(trace_id, 16) in trace_ids and int(flags, 16) & 1 == 0  # not sampled
    record = next(r for r in caplog.records if r.name == "test.telemetry.unsampled")
    assert getattr(record, "trace_id", None) == format(contexts["first"].trace_id, "032x")
    # Every message is still counted and measured.
    assert sampled_out.total("messaging.client.sent.messages") == 2
    assert sampled_out.total("messaging.client.consumed.messages") == 3  # first, second, the RPC request
    assert sampled_out.total("messaging.process.duration") == 3
    assert sampled_out.total("amqpkit.rpc.client.duration") == 1
    assert sampled_out.total("amqpkit.messages.in_flight") == 0


@pytest.fixture
def recording_under_unsampled(request: pytest.FixtureRequest) -> Iterator[InMemorySpanExporter]:
    """Instrumented with a ParentBased sampler that records what an unsampled parent of ``request.param``
    ("remote" or "local") starts."""
    delegate = {f"{request.param}_parent_not_sampled": ALWAYS_ON}
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=ParentBased(ALWAYS_ON, **delegate))
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    telemetry.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield exporter
    finally:
        telemetry.uninstrument()
        tracer_provider.shutdown()
        meter_provider.shutdown()


@pytest.mark.parametrize("recording_under_unsampled", ["remote"], indirect=True)
async def test_a_sampler_that_records_under_an_unsampled_remote_parent_is_still_asked(
    broker: Broker, amqp_url: str, name: str, recording_under_unsampled: InMemorySpanExporter
) -> None:
    """Only a sampler known to drop what an unsampled parent starts is skipped: this one keeps the span."""
    exporter = recording_under_unsampled
    queue = Queue(f"{name}.q", auto_delete=True)
    seen: list[Delivery[bytes]] = []

    async def on_message(delivery: Delivery[bytes]) -> None:
        seen.append(delivery)
        await delivery.ack()

    consumer = await broker.consume(queue, on_message)
    connection = await aiormq.connect(amqp_url)  # a plain client sending an unsampled context
    try:
        channel = await connection.channel()
        unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
        await channel.basic_publish(b"m", routing_key=queue.name,
                                    properties=Basic.Properties(headers={"traceparent": unsampled}))  # fmt: skip
        await wait_for(lambda: len(seen) == 1 and exporter.get_finished_spans())
    finally:
        await connection.close()
        await consumer.cancel()

    spans = list(exporter.get_finished_spans())
    assert [s.kind for s in spans] == [SpanKind.CONSUMER]
    assert spans[0].parent is not None and format(spans[0].parent.span_id, "016x") == "b7ad6b7169203331"
    assert format(spans[0].context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.parametrize("recording_under_unsampled", ["local"], indirect=True)
async def test_a_sampler_that_records_under_an_unsampled_local_parent_is_still_asked(
    broker: Broker, name: str, recording_under_unsampled: InMemorySpanExporter
) -> None:
    exporter = recording_under_unsampled
    queue = Queue(f"{name}.q", auto_delete=True)
    seen: list[Delivery[bytes]] = []

    async def on_message(delivery: Delivery[bytes]) -> None:
        seen.append(delivery)
        await delivery.ack()

    local = trace.NonRecordingSpan(SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=False))
    consumer = await broker.consume(queue, on_message)
    server = RpcServer(broker, Queue(f"{name}.rpc", auto_delete=True))

    @server.method("echo")
    async def echo(payload: str) -> str:
        return payload

    try:
        async with server, RpcClient(broker, f"{name}.rpc", timeout=30) as client:
            with trace.use_span(local):
                await broker.publish(Envelope(b"m"), routing_key=queue.name)
                assert await client.call("echo", "hi", returns=str) == "hi"
            await wait_for(lambda: len(seen) == 1 and len(exporter.get_finished_spans()) == 4)
    finally:
        await consumer.cancel()

    kinds = {s.kind: s for s in exporter.get_finished_spans()}
    assert set(kinds) == {SpanKind.PRODUCER, SpanKind.CONSUMER, SpanKind.CLIENT, SpanKind.SERVER}
    for kind in (SpanKind.PRODUCER, SpanKind.CLIENT):
        parent = kinds[kind].parent
        assert parent is not None and parent.span_id == 0xB7AD6B7169203331
