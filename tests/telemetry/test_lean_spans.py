"""Lean spans: amqpkit's per-message spans skip the SDK's ``Span`` class where the SDK's own processors are the only
ones, export exactly what the SDK's span would have, and leave every other set-up to the SDK."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    SamplingResult,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode, TraceFlags, TraceState

from amqpkit import Broker, Delivery, Envelope, Queue, RpcClient, RpcServer, telemetry
from amqpkit.telemetry import lean
from amqpkit.telemetry.lean import SDK_TESTED_FROM, LeanSpan, LeanTracer, lean_tracer

from ..waiting import wait_for
from .conftest import Telemetry, instrumented

needs_lean = pytest.mark.skipif(
    lean._release() < SDK_TESTED_FROM, reason="an opentelemetry-sdk older than lean spans were checked against"
)


@pytest.fixture
def sdk_spans_made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the SDK ``Span`` objects made while the test runs."""
    made: list[str] = []
    original = sdk_trace._Span.__init__

    def counting(self: Any, name: str, *args: Any, **kwargs: Any) -> None:
        made.append(name)
        original(self, name, *args, **kwargs)

    monkeypatch.setattr(sdk_trace._Span, "__init__", counting)
    return made


async def _pubsub_and_rpc(broker: Broker, name: str, spans: Callable[[], list[ReadableSpan]]) -> None:
    """A one-way message and an RPC call, until their four spans have ended."""
    queue = Queue(f"{name}.q", auto_delete=True)
    server = RpcServer(broker, Queue(f"{name}.rpc", auto_delete=True))

    @server.method("echo")
    async def echo(payload: str) -> str:
        return payload

    async def on_message(delivery: Delivery[bytes]) -> None:
        await delivery.ack()

    consumer = await broker.consume(queue, on_message)
    try:
        async with server, RpcClient(broker, f"{name}.rpc", timeout=30) as client:
            await broker.publish(Envelope(b"one way"), routing_key=queue.name)
            assert await client.call("echo", "hi", returns=str) == "hi"
            await wait_for(lambda: len(spans()) == 4)
    finally:
        await consumer.cancel()


@needs_lean
async def test_message_spans_skip_the_sdk_span_class(
    broker: Broker, name: str, otel: Telemetry, sdk_spans_made: list[str]
) -> None:
    await _pubsub_and_rpc(broker, name, otel.spans)

    assert sdk_spans_made == []
    spans = {s.kind: s for s in otel.spans()}
    assert set(spans) == {SpanKind.PRODUCER, SpanKind.CONSUMER, SpanKind.CLIENT, SpanKind.SERVER}
    assert all(type(s) is LeanSpan for s in spans.values())
    for child, parent in ((SpanKind.CONSUMER, SpanKind.PRODUCER), (SpanKind.SERVER, SpanKind.CLIENT)):
        got, want = spans[child].parent, spans[parent].context
        assert got is not None and want is not None
        assert (got.trace_id, got.span_id, got.is_remote) == (want.trace_id, want.span_id, True)
    assert spans[SpanKind.PRODUCER].attributes["messaging.destination.name"] == ""
    assert spans[SpanKind.PRODUCER].attributes["messaging.rabbitmq.destination.routing_key"] == f"{name}.q"


async def test_without_lean_spans_deliveries_are_still_children_of_their_sends(
    broker: Broker, name: str, sdk_spans_made: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SDK older than lean spans were checked against: the hooks hand the SDK's tracer a delivery's parent
    in a Context, and the SDK's spans link as lean ones do."""
    monkeypatch.setattr(lean, "_release", lambda: (SDK_TESTED_FROM[0], SDK_TESTED_FROM[1] - 1))
    with contextlib.contextmanager(instrumented)() as otel:
        await _pubsub_and_rpc(broker, name, otel.spans)
    spans = {s.kind: s for s in otel.spans()}
    assert len(sdk_spans_made) == 4 and not any(type(s) is LeanSpan for s in spans.values())
    for child, parent in ((SpanKind.CONSUMER, SpanKind.PRODUCER), (SpanKind.SERVER, SpanKind.CLIENT)):
        got, want = spans[child].parent, spans[parent].context
        assert got is not None and want is not None
        assert (got.trace_id, got.span_id, got.is_remote) == (want.trace_id, want.span_id, True)


class _Watching(SpanProcessor):
    """A span processor of the user's own: it sees each span start."""

    def __init__(self) -> None:
        self.started: list[Any] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started.append(span)


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider([InMemoryMetricReader()])
    telemetry.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield tracer_provider, exporter
    finally:
        telemetry.uninstrument()
        tracer_provider.shutdown()
        meter_provider.shutdown()


async def test_a_processor_of_the_users_own_gets_the_sdks_spans(
    broker: Broker, name: str, provider: tuple[TracerProvider, InMemorySpanExporter], sdk_spans_made: list[str]
) -> None:
    """Added after instrument(): from then on every span is the SDK's, and its on_start sees each one."""
    tracer_provider, exporter = provider
    watching = _Watching()
    tracer_provider.add_span_processor(watching)

    await _pubsub_and_rpc(broker, name, lambda: list(exporter.get_finished_spans()))

    assert len(sdk_spans_made) == 4
    assert len(watching.started) == 4
    assert all(isinstance(s, sdk_trace.Span) for s in watching.started)
    assert not any(type(s) is LeanSpan for s in exporter.get_finished_spans())


class _Tagging(Sampler):
    """A sampler of the user's own that adds attributes, one of them a list (the SDK keeps it as a tuple)."""

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None,
                      ) -> SamplingResult:  # fmt: skip
        added = {**(attributes or {}), "sampler.tags": ["a", "b"], "sampler.bad": object()}
        return SamplingResult(Decision.RECORD_AND_SAMPLE, added)

    def get_description(self) -> str:
        return "tagging"


@needs_lean
def test_an_sdk_older_than_checked_gets_the_sdks_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    tracer = TracerProvider().get_tracer("amqpkit")
    monkeypatch.setattr(lean, "_release", lambda: (SDK_TESTED_FROM[0], SDK_TESTED_FROM[1] - 1))
    assert lean_tracer(tracer) is None
    monkeypatch.setattr(lean, "_release", lambda: SDK_TESTED_FROM)
    assert lean_tracer(tracer) is not None


@needs_lean
def test_lean_only_with_the_sdks_own_processors_and_limits() -> None:
    def lean(provider: TracerProvider, sampler: Any = None) -> bool:
        tracer = lean_tracer(provider.get_tracer("amqpkit"))
        if tracer is None:
            return False
        return type(tracer.start_span("x", kind=SpanKind.PRODUCER)) is LeanSpan

    plain = TracerProvider()
    plain.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    plain.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    assert lean(plain)
    assert lean(TracerProvider())  # no processor at all: spans go nowhere, cheaply
    watched = TracerProvider()
    watched.add_span_processor(_Watching())
    assert not lean(watched)

    class MyBatch(BatchSpanProcessor):
        pass

    subclassed = TracerProvider()
    subclassed.add_span_processor(MyBatch(InMemorySpanExporter()))
    assert not lean(subclassed)
    assert not lean(TracerProvider(span_limits=SpanLimits(max_span_attributes=4)))
    assert not lean(TracerProvider(span_limits=SpanLimits(max_span_attribute_length=64)))
    assert lean_tracer(trace.NoOpTracer()) is None
    # the SDK's samplers hand back amqpkit's attributes unchanged (kept as built); a sampler of the user's own
    # may add some, which are then checked (see the next test)
    for sampler, trusted in ((None, True), (ParentBased(TraceIdRatioBased(0.5)), True), (_Tagging(), False),
                             (ParentBased(ALWAYS_OFF, remote_parent_sampled=_Tagging()), False)):  # fmt: skip
        tracer = lean_tracer(TracerProvider(sampler=sampler).get_tracer("x"))
        assert tracer is not None and tracer._trusted is trusted
    for p in (plain, watched, subclassed):
        p.shutdown()


def _parent(span: ReadableSpan, spans: list[ReadableSpan]) -> Any:
    """The span's parent; a local one as the index of that parent in ``spans`` (its ids are random)."""
    parent = span.parent
    if parent is None or parent.is_remote:
        return parent
    ids = [s.context.span_id if s.context else None for s in spans]
    where = ids.index(parent.span_id) if parent.span_id in ids else None
    return ("local", where, parent.trace_flags, parent.trace_state)


def _exported(span: ReadableSpan, spans: list[ReadableSpan]) -> dict[str, Any]:
    """What an exporter reads of a span, with the ids left out (they are random)."""
    return {
        "name": span.name,
        "kind": span.kind,
        "flags": span.context.trace_flags if span.context else None,
        "trace_state": span.context.trace_state if span.context else None,
        "parent": _parent(span, spans),
        "remote": span.context.is_remote if span.context else None,
        "attributes": dict(span.attributes or {}),
        "dropped_attributes": span.dropped_attributes,
        "events": [
            (e.name, {k: v for k, v in (e.attributes or {}).items() if k != "exception.stacktrace"})
            for e in span.events
        ],
        "stack_lines": [
            len(str((e.attributes or {}).get("exception.stacktrace", "")).splitlines()) for e in span.events
        ],
        "dropped_events": span.dropped_events,
        "links": [(link.context, dict(link.attributes or {})) for link in span.links],
        "dropped_links": span.dropped_links,
        "status": (span.status.status_code, span.status.description),
        "resource": span.resource.attributes,
        "scope": span.instrumentation_scope,
        "ended": span.end_time is not None and span.start_time is not None and span.end_time >= span.start_time,
    }


def _start(
    tracer: Any, child: bool, name: str, context: Any, kind: SpanKind, attributes: Any, links: Any = None
) -> Any:
    """``tracer.start_span``; or, with ``child``, the lean tracer's ``start_child`` under the context's span context."""
    if not child:
        return tracer.start_span(name, context, kind, attributes, links)
    parent = trace.get_current_span(context).get_span_context() if context is not None else None
    return tracer.start_child(name, parent, kind, attributes, links)


_SAMPLERS = [
    None,
    TraceIdRatioBased(1.0),
    ParentBased(ALWAYS_OFF),
    ParentBased(
        ALWAYS_ON,
        remote_parent_not_sampled=ALWAYS_ON,
        local_parent_sampled=ALWAYS_OFF,
        local_parent_not_sampled=ALWAYS_ON,
    ),
    _Tagging(),
    ParentBased(_Tagging()),
    ParentBased(TraceIdRatioBased(1.0)),
    ParentBasedTraceIdRatio(0.0),
]
# How many of the test's five spans each sampler keeps: a consumer span under a remote sampled parent, a root,
# and one each under the root, under an unsampled local parent and under an unsampled remote parent.
_KEPT = (3, 5, 1, 4, 5, 3, 3, 1)


@needs_lean
@pytest.mark.parametrize(("sampler", "kept"), list(zip(_SAMPLERS, _KEPT, strict=True)))
def test_a_lean_span_exports_what_the_sdks_span_would(sampler: Any, kept: int) -> None:
    """The same calls on a lean span and on the SDK's: what the exporter gets is the same, field by field; and the
    same with each parent handed to ``start_child`` as a span context (as the consume hook hands a delivery's)."""
    limits = SpanLimits(max_events=3, max_links=2, max_event_attributes=8)
    resource = Resource.create({"service.name": "lean-test"})
    got: dict[str, list[ReadableSpan]] = {}
    for how in ("sdk", "lean", "child"):
        exporter = InMemorySpanExporter()
        provider = TracerProvider(resource=resource, span_limits=limits, sampler=sampler)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        sdk_tracer = provider.get_tracer("amqpkit", "1.0")
        lean = lean_tracer(sdk_tracer)
        assert lean is not None
        start = partial(_start, sdk_tracer if how == "sdk" else lean, how == "child")
        remote = SpanContext(0x1234, 0x5678, True, TraceFlags(1))
        first = SpanContext(0xABC, 0xDEF, True, TraceFlags(1))
        parent = trace.set_span_in_context(trace.NonRecordingSpan(remote))
        span = start("process q", parent, SpanKind.CONSUMER, {"messaging.system": "rabbitmq", "n": 3},
                     [Link(first, {"amqpkit.link": "first attempt"})])  # fmt: skip
        assert (type(span) is LeanSpan) is (how != "sdk")
        span.set_attribute("handler.set", "yes")
        span.set_attributes({"bad": object(), "list": [1, 2]})  # an invalid value: dropped
        span.add_event("retry", {"next": 2})
        try:
            raise KeyError("missing")
        except KeyError as exc:
            span.record_exception(exc)
        for n in range(3):
            span.add_event(f"extra {n}")  # past max_events: dropped and counted
        span.add_link(SpanContext(0x99, 0x98, True, TraceFlags(0)), {"why": "test"})
        span.add_link(SpanContext(0x97, 0x96, True, TraceFlags(0)))  # past max_links
        span.update_name("process q renamed")
        span.set_status(StatusCode.ERROR, "broken")
        span.set_status(StatusCode.UNSET)  # ignored
        span.end()
        span.set_attribute("after", "end")  # ignored, with a warning
        span.end()  # a second end: ignored, with a warning
        root = start("send x", None, SpanKind.PRODUCER, {"a": 1})
        root.set_status(trace.Status(StatusCode.OK))
        root.set_status(StatusCode.ERROR, "too late")  # OK is final
        # every branch of ParentBased: a local parent (sampled or not), a remote one not sampled, with a state
        local = trace.set_span_in_context(root)
        unsampled_local = trace.set_span_in_context(
            trace.NonRecordingSpan(SpanContext(0x4321, 0x8765, False, TraceFlags(0), TraceState([("k", "v")])))
        )
        unsampled_remote = trace.set_span_in_context(
            trace.NonRecordingSpan(SpanContext(0x1111, 0x2222, True, TraceFlags(0), TraceState([("vendor", "x")])))
        )
        for branch, context in (("local", local), ("unsampled local", unsampled_local),
                                ("unsampled remote", unsampled_remote)):  # fmt: skip
            start(f"under {branch}", context, SpanKind.CONSUMER, {"b": 2}).end()
        root.end()
        got[how] = list(exporter.get_finished_spans())
        provider.shutdown()
    sdk = [_exported(s, got["sdk"]) for s in got["sdk"]]
    assert [_exported(s, got["lean"]) for s in got["lean"]] == sdk
    assert [_exported(s, got["child"]) for s in got["child"]] == sdk
    assert len(got["lean"]) == kept
    assert isinstance(lean_tracer(TracerProvider().get_tracer("x")), LeanTracer)


@needs_lean
def test_a_parent_based_sampler_of_fixed_decisions_is_not_asked_per_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's default sampler (and any ParentBased over ALWAYS_ON/ALWAYS_OFF, or with the SDK's
    TraceIdRatioBased as its root) is decided in place; a subclass of ParentBased, or a delegate or root of the
    user's own, is asked as before."""
    asked: list[str] = []
    for cls in (ParentBased, StaticSampler, TraceIdRatioBased):
        original = cls.should_sample

        def counting(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            asked.append(type(self).__name__)
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "should_sample", counting)

    class Mine(ParentBased):
        pass

    remote = trace.set_span_in_context(trace.NonRecordingSpan(SpanContext(0x1234, 0x5678, True, TraceFlags(1))))
    # (sampler, should_sample calls counted for a root and a child of a remote parent): the subclass and its
    # static delegate for each; ParentBased for each, with the user's root (not counted) or ALWAYS_ON under it
    for sampler, calls in ((None, 0), (ParentBased(ALWAYS_OFF), 0), (ParentBased(TraceIdRatioBased(0.5)), 0),
                           (ParentBasedTraceIdRatio(0.5), 0),  # OTEL_TRACES_SAMPLER=parentbased_traceidratio's
                           (Mine(ALWAYS_ON), 4), (Mine(TraceIdRatioBased(0.5)), 4), (ParentBased(_Tagging()), 3),
                           (ParentBased(_Ratio(0.5)), 4)):  # fmt: skip
        tracer = lean_tracer(TracerProvider(sampler=sampler).get_tracer("amqpkit"))
        assert tracer is not None
        asked.clear()
        for context in (None, remote):
            tracer.start_span("s", context, SpanKind.CONSUMER, {"a": 1}).end()
        assert len(asked) == calls, sampler


class _Ratio(TraceIdRatioBased):
    """A ratio sampler of the user's own (a subclass): asked for every root, as any sampler not the SDK's."""


@needs_lean
def test_a_ratio_sampler_that_decides_otherwise_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a release's TraceIdRatioBased decide by another rule (here: the high 64 bits), the in-place rule no
    longer matches what it answers, and it is asked for every root as before."""

    def high_bits(self: Any, parent_context: Any, trace_id: int, *args: Any, **kwargs: Any) -> SamplingResult:
        sampled = (trace_id >> 64) < self.bound
        return SamplingResult(Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP, None, None)

    monkeypatch.setattr(TraceIdRatioBased, "should_sample", high_bits)
    assert lean._ratio_root(ParentBased(TraceIdRatioBased(0.5))) is None
    tracer = lean_tracer(TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5))).get_tracer("amqpkit"))
    assert tracer is not None and tracer._static is None  # asked, per span
    monkeypatch.undo()
    assert lean._ratio_root(ParentBased(TraceIdRatioBased(0.5))) is not None


class _TraceIds(RandomIdGenerator):
    """Hands out the trace ids it was given, in order; span ids at random."""

    def __init__(self, trace_ids: list[int]) -> None:
        self.trace_ids = list(trace_ids)

    def generate_trace_id(self) -> int:
        return self.trace_ids.pop(0)


@needs_lean
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("ratio_sampler", [lambda rate: ParentBased(TraceIdRatioBased(rate)), ParentBasedTraceIdRatio])
def test_a_ratio_root_is_decided_in_place_as_the_sdk_decides_it(rate: float, ratio_sampler: Any) -> None:
    """``ParentBased(TraceIdRatioBased(rate))``, the usual way to sample (and ``ParentBasedTraceIdRatio``, which
    ``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` makes): a root's decision, worked out in place from its trace
    id, is the SDK's for ids on both sides of the bound and with high bits set (only the low 64 bits count), and a
    recorded root keeps every attribute."""
    bound = TraceIdRatioBased(rate).bound
    low = (1 << 64) - 1
    ids = [1, max(bound - 1, 1), max(bound, 1), bound + 1, low, (7 << 64) | max(bound - 1, 1), (7 << 64) | bound]
    ids = [trace_id for trace_id in ids if 0 < trace_id < 1 << 128]
    got: dict[str, list[tuple[int, bool, bool, int, str]]] = {}
    for how in ("sdk", "lean"):
        exporter = InMemorySpanExporter()
        provider = TracerProvider(sampler=ratio_sampler(rate), id_generator=_TraceIds(ids))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        sdk_tracer = provider.get_tracer("amqpkit")
        tracer: Any = sdk_tracer if how == "sdk" else lean_tracer(sdk_tracer)
        assert tracer is not None
        decided = []
        for _ in ids:
            span = tracer.start_span("send q", None, SpanKind.PRODUCER, {"a": 1, "b": "two"})
            context = span.get_span_context()
            if how == "lean" and span.is_recording():
                assert type(span) is LeanSpan  # decided here, not handed to the SDK
            decided.append((context.trace_id, context.trace_flags.sampled, span.is_recording(),
                            int(context.trace_flags), context.trace_state.to_header()))  # fmt: skip
            span.end()
        got[how] = decided
        assert [dict(s.attributes or {}) for s in exporter.get_finished_spans()] == [
            {"a": 1, "b": "two"} for _, sampled, *_ in decided if sampled
        ]
        provider.shutdown()
    assert got["lean"] == got["sdk"]
    sampled = [trace_id for trace_id, is_sampled, *_ in got["sdk"] if is_sampled]
    assert sampled == [trace_id for trace_id in ids if trace_id & low < bound]  # both sides of the bound were met
    if 0 < rate < 1:
        assert sampled and len(sampled) < len(ids)


@needs_lean
def test_the_ratio_root_is_looked_at_once_per_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the root is decided per trace id, and the fixed decisions built around that, come from one look at
    the sampler: a second look that answered otherwise could leave every root dropped."""
    looks: list[Any] = []
    original = lean._ratio_root

    def first_look_only(sampler: Any) -> Any:
        looks.append(sampler)
        return original(sampler) if len(looks) == 1 else None

    monkeypatch.setattr(lean, "_ratio_root", first_look_only)
    tracer = lean_tracer(TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0))).get_tracer("amqpkit"))
    assert tracer is not None
    span = tracer.start_span("send q", None, SpanKind.PRODUCER, {"a": 1})
    assert type(span) is LeanSpan and span.get_span_context().trace_flags.sampled
    span.end()
    assert len(looks) == 1


class _Ending(SpanProcessor):
    """A processor of the user's own that keeps what it is handed at each span's end."""

    def __init__(self) -> None:
        self.ended: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


@needs_lean
def test_a_processor_added_while_a_span_is_open_sees_it_end() -> None:
    """As with the SDK's spans: the processors at a span's end are the ones told of it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = lean_tracer(provider.get_tracer("amqpkit"))
    assert tracer is not None
    span = tracer.start_span("send x", kind=SpanKind.PRODUCER)
    assert type(span) is LeanSpan
    ending = _Ending()
    provider.add_span_processor(ending)
    span.end()
    assert ending.ended == [span]
    assert list(exporter.get_finished_spans()) == [span]
    provider.shutdown()
