"""A sampler makes the cost proportional: a sampled-out message still carries its trace and is counted, with
no attribute work; and what the hooks keep per destination does not leak from one destination to another."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, NonRecordingSpan, SpanKind
from opentelemetry.util.types import Attributes

from amqpkit import Broker, Delivery, Envelope, Exchange, Queue, Subscriber, telemetry
from amqpkit.telemetry.instruments import Tally, drops_unsampled_children

from ..waiting import wait_for
from .conftest import Telemetry


class _Watching(Sampler):
    """ParentBased(ALWAYS_OFF), remembering the attributes each decision was shown."""

    def __init__(self) -> None:
        self.inner = ParentBased(ALWAYS_OFF)
        self.shown: list[dict[str, Any]] = []

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        self.shown.append(dict(attributes or {}))
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return "watching ParentBased(ALWAYS_OFF)"


class _MyParentBased(ParentBased):
    """A ParentBased of the user's own: it may decide otherwise, so it is asked."""


@pytest.mark.parametrize(
    ("sampler", "drops"),
    [
        (None, True),  # the SDK's default, ParentBased(ALWAYS_ON)
        (ParentBased(TraceIdRatioBased(0.1)), True),
        (ParentBasedTraceIdRatio(0.1), True),  # what OTEL_TRACES_SAMPLER=parentbased_traceidratio makes
        (ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON), False),
        (_MyParentBased(ALWAYS_ON), False),
        (TraceIdRatioBased(0.1), False),
    ],
)
def test_which_samplers_are_known_to_drop_every_child_of_an_unsampled_parent(sampler: Any, drops: bool) -> None:
    """Under these, a message whose context is not sampled gets no span and the SDK is not asked."""
    provider = TracerProvider(sampler=sampler)
    try:
        assert drops_unsampled_children(provider.get_tracer("amqpkit")) is drops
    finally:
        provider.shutdown()


@pytest.fixture
def sampled_out(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[_Watching, InMemorySpanExporter, Telemetry]]:
    sampler = _Watching()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield sampler, exporter, Telemetry(exporter, reader)
    finally:
        telemetry.uninstrument()
        tracer_provider.shutdown()
        meter_provider.shutdown()


async def test_sampled_out_message_keeps_its_trace_and_counts_without_attribute_work(
    broker: Broker, name: str, sampled_out: tuple[_Watching, InMemorySpanExporter, Telemetry],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    sampler, exporter, otel = sampled_out
    set_on_dropped: list[Any] = []
    monkeypatch.setattr(NonRecordingSpan, "set_attributes", lambda self, a: set_on_dropped.append(a))
    monkeypatch.setattr(NonRecordingSpan, "set_attribute", lambda self, k, v: set_on_dropped.append({k: v}))
    queue = Queue(f"{name}.q", auto_delete=True)
    seen: list[tuple[Delivery[bytes], Any]] = []
    handler_log = logging.getLogger("test.telemetry.sampled")

    async def on_message(delivery: Delivery[bytes]) -> None:
        handler_log.warning("handling")
        seen.append((delivery, trace.get_current_span().get_span_context()))
        await delivery.ack()

    consumer = await broker.consume(queue, on_message)
    try:
        with caplog.at_level(logging.WARNING, logger="test.telemetry.sampled"):
            await broker.publish(Envelope(b"12345", correlation_id="conv-9"), routing_key=queue.name)
            await wait_for(lambda: seen and otel.total("amqpkit.messages.acked") == 1)
    finally:
        await consumer.cancel()

    assert exporter.get_finished_spans() == ()  # nothing recorded
    delivery, current = seen[0]
    # The context still travelled: the handler runs in the publisher's trace, marked not sampled.
    version, trace_id, _, flags = str(delivery.headers["traceparent"]).split("-")
    assert version == "00" and int(flags, 16) & 1 == 0
    assert current.is_valid and format(current.trace_id, "032x") == trace_id
    record = next(r for r in caplog.records if r.name == "test.telemetry.sampled")
    assert getattr(record, "trace_id", None) == trace_id  # log lines still carry it
    # The sampler saw what the conventions list as sampling-relevant, and nothing of the message itself.
    publish_shown, process_shown = sampler.shown
    assert publish_shown["messaging.system"] == "rabbitmq" and publish_shown["messaging.operation.type"] == "send"
    assert publish_shown["messaging.rabbitmq.destination.routing_key"] == queue.name
    assert process_shown["messaging.destination.subscription.name"] == queue.name
    for shown in (publish_shown, process_shown):
        assert not {"messaging.message.id", "messaging.message.body.size", "messaging.message.conversation_id"} & set(
            shown
        )
    assert set_on_dropped == []  # and no attributes were built for the spans it dropped
    # Metrics count every message, sampled or not.
    assert otel.total("messaging.client.sent.messages") == 1
    assert otel.total("messaging.client.consumed.messages") == 1
    assert otel.total("messaging.process.duration") == 1
    assert otel.total("amqpkit.messages.in_flight") == 0


async def test_each_destination_keeps_its_own_names_attributes_and_counts(
    broker: Broker, name: str, otel: Telemetry
) -> None:
    exchange = Exchange(f"{name}.events", type="topic")
    seen: list[Delivery[bytes]] = []

    async def on_event(delivery: Delivery[bytes]) -> None:
        seen.append(delivery)
        await delivery.ack()

    try:
        async with Subscriber(broker, exchange, on_event, queue=Queue(f"{name}.all", auto_delete=True),
                              binding_keys=["#"]):  # fmt: skip
            for key, body in (("a.one", b"1"), ("b.two", b"22"), ("a.one", b"333")):
                await broker.publish(Envelope(body), exchange=exchange, routing_key=key)
            await broker.publish(Envelope(b"4444"), routing_key=f"{name}.all")  # the default exchange, same queue
            await wait_for(lambda: len([s for s in otel.spans() if s.kind is SpanKind.CONSUMER]) == 4)
    finally:
        await broker.delete_exchange(exchange.name)

    sends = sorted((s for s in otel.spans() if s.kind is SpanKind.PRODUCER), key=lambda s: s.start_time or 0)
    assert [s.name for s in sends] == [f"send {exchange.name}"] * 3 + [f"send {name}.all"]
    assert [s.attributes["messaging.rabbitmq.destination.routing_key"] for s in sends] == [
        "a.one", "b.two", "a.one", f"{name}.all"
    ]  # fmt: skip
    assert [s.attributes["messaging.message.body.size"] for s in sends] == [1, 2, 3, 4]
    assert [s.attributes["messaging.destination.name"] for s in sends] == [exchange.name] * 3 + [""]
    processes = {s.attributes["messaging.message.body.size"]: s for s in otel.spans() if s.kind is SpanKind.CONSUMER}
    for send in sends:
        process = processes[send.attributes["messaging.message.body.size"]]
        assert process.parent is not None and process.parent.span_id == send.context.span_id
        for attribute in ("messaging.destination.name", "messaging.rabbitmq.destination.routing_key",
                          "messaging.message.id"):  # fmt: skip
            assert process.attributes[attribute] == send.attributes[attribute]
        assert process.name == f"process {name}.all"
    by_exchange = {attrs["messaging.destination.name"]: n for attrs, n in otel.metric("messaging.client.sent.messages")}
    assert by_exchange == {exchange.name: 3, "": 1}
    assert otel.total("messaging.client.consumed.messages") == 4
    assert otel.total("amqpkit.messages.acked") == 4


class _Scripted(Sampler):
    """PRODUCER spans sampled as scripted, in order; every other span follows its parent (as ParentBased does)."""

    def __init__(self, script: list[bool]) -> None:
        self.script = list(script)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if kind is SpanKind.PRODUCER:
            record = self.script.pop(0)
        else:
            record = trace.get_current_span(parent_context).get_span_context().trace_flags.sampled
        decision = Decision.RECORD_AND_SAMPLE if record else Decision.DROP
        return SamplingResult(decision, attributes if record else None)

    def get_description(self) -> str:
        return "scripted"


async def test_recorded_spans_get_every_attribute_whichever_the_sampler_decided_before(
    broker: Broker, name: str
) -> None:
    """A destination whose last span recorded and one whose last span was dropped take different paths."""
    script = [False, True, True, False, True]
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=_Scripted(script))
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    telemetry.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    queue = Queue(f"{name}.q", auto_delete=True)
    seen: list[Delivery[bytes]] = []

    async def on_message(delivery: Delivery[bytes]) -> None:
        seen.append(delivery)
        await delivery.ack()

    try:
        consumer = await broker.consume(queue, on_message)
        try:
            for n in range(len(script)):
                await broker.publish(Envelope(b"x" * (n + 1), correlation_id=f"c{n}"), routing_key=queue.name)
            await wait_for(lambda: len(seen) == len(script) and len(exporter.get_finished_spans()) == 2 * sum(script))
        finally:
            await consumer.cancel()
    finally:
        telemetry.uninstrument()
        tracer_provider.shutdown()
        meter_provider.shutdown()

    sizes = sorted(n + 1 for n, record in enumerate(script) if record)
    for kind in (SpanKind.PRODUCER, SpanKind.CONSUMER):
        spans = sorted((s for s in exporter.get_finished_spans() if s.kind is kind),
                       key=lambda s: s.attributes["messaging.message.body.size"])  # fmt: skip
        assert [s.attributes["messaging.message.body.size"] for s in spans] == sizes
        for span in spans:
            size = span.attributes["messaging.message.body.size"]
            assert span.attributes["messaging.message.conversation_id"] == f"c{size - 1}"
            assert span.attributes["messaging.message.id"]
            assert span.attributes["messaging.system"] == "rabbitmq"
            assert span.attributes["messaging.rabbitmq.destination.routing_key"] == queue.name
            if kind is SpanKind.CONSUMER:
                assert span.attributes["messaging.rabbitmq.message.delivery_tag"] >= 1


async def test_counts_by_destination_overflow_into_one_past_the_limit(
    broker: Broker, name: str, otel: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One count was kept, and observed at every collection, for every exchange ever published to (a hunt: 1,891
    after 4 minutes of short-lived exchanges). Past the limit they share one, marked as OpenTelemetry marks it."""
    monkeypatch.setattr(Tally, "LIMIT", 3)
    names = [f"{name}.x{i}" for i in range(6)]
    for exchange in names:
        await broker.declare_exchange(Exchange(exchange, type="fanout", durable=False, auto_delete=False))
    try:
        for exchange in names:
            await broker.publish(Envelope(b"x"), exchange=exchange, routing_key="")
        points = otel.metric("messaging.client.sent.messages")
        assert len(points) <= 4, points
        assert sum(n for _, n in points) == 6
        assert any(attrs.get("otel.metric.overflow") is True for attrs, _ in points), points
    finally:
        for exchange in names:
            await broker.delete_exchange(exchange)
