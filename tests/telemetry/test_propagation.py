"""Reading trace context from headers: amqpkit's own reading of a plain version-00 ``traceparent`` decides
exactly as OpenTelemetry's W3C propagator does, for well-formed and malformed headers alike; and its writing
writes what the propagator writes."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from amqpkit.telemetry import propagation
from amqpkit.telemetry.propagation import EMPTY, extract, in_context, inject, remote_parent

TRACE, SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"

CASES: list[dict[str, Any]] = [
    {"traceparent": f"00-{TRACE}-{SPAN}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-00"},
    {"traceparent": f"00-{TRACE}-{SPAN}-03"},
    {"traceparent": f"00-{TRACE}-{SPAN}-ff"},  # every flag bit, known or not
    {"traceparent": f"00-{TRACE}-{SPAN}-02"},  # random trace id, not sampled
    {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "vendor=abc,other=1"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01".encode()},  # bytes, as some clients' headers arrive
    {"traceparent": f"00-{TRACE.upper()}-{SPAN}-01"},  # upper-case hex: malformed
    {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},  # all-zero trace id
    {"traceparent": f"00-{TRACE}-{'0' * 16}-01"},  # all-zero span id
    {"traceparent": f"ff-{TRACE}-{SPAN}-01"},  # version ff is invalid
    {"traceparent": f"00-{TRACE}-{SPAN}-01-extra"},  # version 00 has no more fields
    {"traceparent": f"01-{TRACE}-{SPAN}-01-extra"},  # a later version may
    {"traceparent": f" 00-{TRACE}-{SPAN}-01"},  # leading blank
    {"traceparent": f"00-{TRACE}-{SPAN}-0g"},
    {"traceparent": f"00_{TRACE}-{SPAN}-01"},
    {"traceparent": "00-not-a-trace-01"},
    {"traceparent": 12345},
    {"traceparent": ""},
    {},
]


def _sdk(headers: dict[str, Any]) -> Context:
    """What OpenTelemetry's W3C propagator reads from ``headers`` (bytes decoded, as amqpkit's getter does)."""
    carrier = {k: v.decode("latin-1") if isinstance(v, bytes) else str(v) for k, v in headers.items()}
    return TraceContextTextMapPropagator().extract(carrier, context=EMPTY)


@pytest.mark.parametrize("headers", CASES, ids=[str(c.get("traceparent", "none"))[:48] for c in CASES])
def test_extract_decides_as_the_w3c_propagator(headers: dict[str, Any]) -> None:
    ours, theirs = extract(headers), _sdk(headers)
    ours_span, theirs_span = trace.get_current_span(ours), trace.get_current_span(theirs)
    assert ours_span.get_span_context() == theirs_span.get_span_context()
    assert ours_span.get_span_context().trace_state == theirs_span.get_span_context().trace_state
    if not theirs_span.get_span_context().is_valid:
        assert ours is EMPTY  # a new trace
    else:
        assert ours_span.get_span_context().is_remote


@pytest.mark.parametrize("headers", CASES, ids=[str(c.get("traceparent", "none"))[:48] for c in CASES])
def test_remote_parent_is_the_span_context_the_w3c_propagator_reads(headers: dict[str, Any]) -> None:
    """The consume hook's reading: the propagator's span context itself (None for a new trace), and the Context
    ``in_context`` builds from it is the one ``extract`` gives."""
    ours, theirs = remote_parent(headers), trace.get_current_span(_sdk(headers)).get_span_context()
    if not theirs.is_valid:
        assert ours is None
        assert in_context(ours) is EMPTY
        return
    assert ours == theirs
    assert ours is not None and ours.trace_state == theirs.trace_state and ours.is_remote
    assert type(ours) is SpanContext and type(ours.trace_flags) is TraceFlags and ours.is_valid
    assert repr(ours) == repr(theirs)
    for built in (in_context(ours), extract(headers)):  # the propagator's Context: its span, and nothing else
        assert list(built) == list(_sdk(headers))
        assert trace.get_current_span(built).get_span_context() == theirs


def test_a_span_context_built_as_a_tuple_is_the_constructed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """remote_parent builds its SpanContext without the constructor only while the SDK's layout is the one
    checked at import; with that check failed, the constructor builds the same."""
    assert propagation.SPAN_CONTEXT_AS_TUPLE  # this SDK's layout is the known one
    headers = {"traceparent": f"00-{TRACE}-{SPAN}-01"}
    fast = remote_parent(headers)
    monkeypatch.setattr(propagation, "SPAN_CONTEXT_AS_TUPLE", False)
    slow = remote_parent(headers)
    expected = SpanContext(int(TRACE, 16), int(SPAN, 16), True, TraceFlags(1))
    assert fast is not None and slow is not None
    for built in (fast, slow):
        assert tuple(built) == tuple(expected) and type(built) is SpanContext
        assert (built.trace_id, built.span_id, built.is_remote, built.trace_flags, built.is_valid) == (
            int(TRACE, 16), int(SPAN, 16), True, 1, True)  # fmt: skip
        assert built.trace_state == expected.trace_state


INJECTED = [
    SpanContext(int(TRACE, 16), int(SPAN, 16), False, TraceFlags(TraceFlags.SAMPLED)),
    SpanContext(int(TRACE, 16), int(SPAN, 16), False, TraceFlags(TraceFlags.DEFAULT)),
    SpanContext(int(TRACE, 16), int(SPAN, 16), False, TraceFlags(0x03)),  # sampled, random trace id
    SpanContext(1, 1, False, TraceFlags(TraceFlags.SAMPLED)),  # leading zeros
    SpanContext(2**128 - 1, 2**64 - 1, True, TraceFlags(0xFF)),  # the largest of each
    SpanContext(int(TRACE, 16), int(SPAN, 16), True, TraceFlags(1), TraceState([("vendor", "abc"), ("other", "1")])),
    INVALID_SPAN_CONTEXT,  # nothing written
]


@pytest.mark.parametrize("span_context", INJECTED, ids=range(len(INJECTED)))
def test_inject_writes_what_the_w3c_propagator_writes(span_context: SpanContext) -> None:
    ours: dict[str, Any] = {}
    inject(span_context, ours)
    theirs: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(theirs, context=trace.set_span_in_context(NonRecordingSpan(span_context)))
    assert ours == theirs
