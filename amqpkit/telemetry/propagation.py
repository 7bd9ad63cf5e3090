"""Trace context in AMQP headers: W3C ``traceparent``/``tracestate`` read and written, and a retried task's link.

The headers are read with OpenTelemetry's W3C propagator (string values may arrive as bytes) and written
directly from the span context, without building a Context first.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

log = logging.getLogger("amqpkit.telemetry")

FIRST_ATTEMPT_HEADER = "x-trace-first-attempt"
"""A retried task's header: the ``traceparent`` of its first attempt's span, which later attempts link to."""


_PROPAGATOR = TraceContextTextMapPropagator()
EMPTY = Context()
"""The empty context: what :func:`extract` gives for a message that carries none (a new trace)."""


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads AMQP headers, whose string values may arrive as bytes."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        return [str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


_VERSION_00 = re.compile("00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_NO_TRACE, _NO_SPAN = "0" * 32, "0" * 16
_FLAGS_BY_TEXT = {f"{flags:02x}": TraceFlags(flags) for flags in range(256)}  # a traceparent's last field, read
_tuple_new = tuple.__new__


def _same_as_constructed() -> bool:
    """Whether a SpanContext is still the 6-tuple its constructor builds (ids, remote, flags, state, valid)."""
    flags, state = TraceFlags(1), TraceState([("k", "v")])
    try:
        built = _tuple_new(SpanContext, (3, 4, True, flags, state, True))
        made = SpanContext(3, 4, True, flags, state)
        read = (built.trace_id, built.span_id, built.is_remote, built.trace_flags, built.trace_state, built.is_valid)
    except Exception:  # another layout: the constructor is used
        return False
    return type(made) is SpanContext and tuple(made) == tuple(built) and read == (3, 4, True, flags, state, True)


SPAN_CONTEXT_AS_TUPLE = _same_as_constructed()
"""True when :func:`valid_span_context` may build a SpanContext as its constructor does, without calling it."""


def valid_span_context(
    trace_id: int, span_id: int, is_remote: bool, flags: TraceFlags, state: TraceState
) -> SpanContext:
    """``SpanContext(trace_id, span_id, is_remote, flags, state)`` for ids already known valid (non-zero, within
    128 and 64 bits), built as its constructor builds it, in about half the time."""
    if SPAN_CONTEXT_AS_TUPLE:
        return _tuple_new(SpanContext, (trace_id, span_id, is_remote, flags, state, True))
    return SpanContext(trace_id, span_id, is_remote, flags, state)


def remote_parent(headers: Mapping[str, Any]) -> SpanContext | None:
    """The remote span context a message's headers carry, or None (no context, or a malformed one: a new trace).

    What amqpkit itself writes (a version-00 ``traceparent``, no ``tracestate``) is read here, in half the time
    the propagator takes (no getter, no per-call pattern look-up, no Context built around it); anything else goes
    to the propagator, which decides as it always did.
    """
    value = headers.get("traceparent")
    if value is None:
        return None
    if type(value) is str and len(value) == 55 and "tracestate" not in headers:
        match = _VERSION_00.fullmatch(value)
        if match is not None:
            trace_id, span_id, flags = match.groups()
            if trace_id != _NO_TRACE and span_id != _NO_SPAN:  # 32 and 16 hex digits, not all zero: valid
                return valid_span_context(int(trace_id, 16), int(span_id, 16), True, _FLAGS_BY_TEXT[flags],
                                          DEFAULT_TRACE_STATE)  # fmt: skip
    ctx = _PROPAGATOR.extract(headers, context=EMPTY, getter=_GETTER)
    if ctx is EMPTY:  # the propagator hands back the context it was given when the header does not parse
        shown = str(headers.get("traceparent"))[:80]
        log.debug("ignored a malformed traceparent header %r; the message starts a new trace", shown)
        return None
    found: SpanContext = trace.get_current_span(ctx).get_span_context()
    return found


def in_context(span_context: SpanContext | None) -> Context:
    """A Context whose current span is ``span_context`` (as the W3C propagator builds it), or :data:`EMPTY`."""
    if span_context is None:
        return EMPTY
    return trace.set_span_in_context(NonRecordingSpan(span_context), EMPTY)


def extract(headers: Mapping[str, Any]) -> Context:
    """The trace context a message's headers carry, or an empty context (a new trace) when none or malformed."""
    return in_context(remote_parent(headers))


def inject(span_context: SpanContext, headers: dict[str, Any]) -> None:
    """W3C ``traceparent`` (and ``tracestate``) for ``span_context``, as the W3C propagator writes them.

    Written here rather than through the propagator, which wants the span in a new Context first.
    """
    if span_context.is_valid:
        # %-formatting: the same text as an f-string with the same specs, in about 65 % of the time (1.0 against
        # 1.6 µs in a hot loop; the f-string goes through each value's __format__, TraceFlags's included)
        headers["traceparent"] = "00-%032x-%016x-%02x" % (  # noqa: UP031
            span_context.trace_id,
            span_context.span_id,
            span_context.trace_flags,
        )
        if span_context.trace_state:
            headers["tracestate"] = span_context.trace_state.to_header()


def traceparent(span: Span) -> str | None:
    """The ``traceparent`` header value for ``span`` (None for an invalid span context)."""
    carrier: dict[str, Any] = {}
    inject(span.get_span_context(), carrier)
    return carrier.get("traceparent")


def link_to_first(headers: Mapping[str, Any]) -> list[Link] | None:
    """The link to a retried task's first attempt (its ``FIRST_ATTEMPT_HEADER``), or None."""
    value = headers.get(FIRST_ATTEMPT_HEADER)
    if value is None:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": value}, context=EMPTY, getter=_GETTER)
    first: SpanContext = trace.get_current_span(ctx).get_span_context()
    if not first.is_valid:
        log.debug("ignored a malformed %s header %r", FIRST_ATTEMPT_HEADER, str(value)[:80])
        return None
    return [Link(first, {"amqpkit.link": "first attempt"})]
