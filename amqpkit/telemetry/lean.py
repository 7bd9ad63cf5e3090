"""Lean spans: the spans amqpkit makes per message, built without the SDK's ``Span`` class when that is safe.

The SDK's ``Tracer.start_span`` and ``Span.end`` do much that a message's span never uses: a lock, each
attribute checked on its own for attributes amqpkit already built valid, two bounded lists, a second
``ReadableSpan`` copied at the end, and three rounds of span-processor calls, two of which do nothing for the
SDK's own processors. :class:`LeanTracer` makes the same span without them: 41-45 µs against 11-14 per span with nine
attributes and a batch processor, in a hot loop on a two-CPU VM (docs/observability-cost-rounds.md, "Lean spans").

It is used only where the result is the same span the SDK would have made, and hands everything else to the
SDK's tracer (see :func:`lean_tracer` and :meth:`LeanTracer.start_span`):

- the tracer is the SDK's ``Tracer`` (release :data:`SDK_TESTED_FROM` or later), enabled, with the SDK's
  internal metrics off;
- every span processor is the SDK's ``BatchSpanProcessor`` or ``SimpleSpanProcessor`` (whose ``on_start``
  and ``_on_ending`` do nothing), checked again whenever the provider's processors change;
- the span limits allow at least :data:`ATTRIBUTES_NEEDED` attributes with no length limit.

The sampler and the id generator are the tracer's own, asked exactly as ``Tracer.start_span`` asks them; a
``ParentBased`` whose delegates are all ``ALWAYS_ON``/``ALWAYS_OFF`` and whose root is one of those too (the SDK's
default sampler is one) or the SDK's ``TraceIdRatioBased`` (the usual way to sample) is not asked: its decision
and trace state follow from the parent, or for a root from the trace id, and are worked out in place. The span
processors get a ``ReadableSpan`` with the tracer's resource and instrumentation scope. A span a
handler adds attributes, events or links to applies the tracer's limits to them, as the SDK's span does.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from time import time_ns
from typing import Any, cast

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace import sampling as sdk_sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from .propagation import in_context

log = logging.getLogger("amqpkit.telemetry")

SDK_TESTED_FROM = (1, 44)
"""The oldest opentelemetry-sdk release lean spans were checked against (older ones get the SDK's spans)."""

ATTRIBUTES_NEEDED = 32
"""Span limits below this many attributes (or with a length limit) leave every span to the SDK."""

_PROCESSORS_KNOWN = (BatchSpanProcessor, SimpleSpanProcessor)
PARENT_BASED = tuple(
    cls for cls in (ParentBased, ParentBasedTraceIdRatio) if cls.should_sample is ParentBased.should_sample
)
"""The SDK's ``ParentBased`` and its subclass that ``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` makes (which
only builds the root), when that decides as ``ParentBased`` does: their delegates are what decides."""
_UNSET = Status(StatusCode.UNSET)
_FROM_PARENT = Context()  # start_child's stand-in for a Context not built yet (compared by identity)
_RANDOM = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)  # newer APIs only; without it lean_tracer declines
_FLAGS = {
    (sampled, random): TraceFlags((TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT) | (_RANDOM if random else 0))
    for sampled in (False, True)
    for random in (False, True)
}


def lean_tracer(tracer: Any) -> LeanTracer | None:
    """A :class:`LeanTracer` over ``tracer``, or None when ``tracer`` is not one it can stand in for."""
    if type(tracer) is not sdk_trace.Tracer or _release() < SDK_TESTED_FROM:
        return None
    needed = ("sampler", "resource", "span_processor", "id_generator", "instrumentation_info", "_span_limits",
              "_instrumentation_scope", "_tracer_metrics", "_is_enabled")  # fmt: skip
    if not all(hasattr(tracer, name) for name in needed):  # another SDK version: leave it to the SDK
        return None
    if not hasattr(tracer.span_processor, "_span_processors") or not hasattr(tracer.id_generator, "is_trace_id_random"):
        return None
    if not _RANDOM:
        return None
    return LeanTracer(tracer)


class LeanTracer:
    """Starts amqpkit's per-message spans as :class:`LeanSpan` where that is safe, and through the SDK otherwise."""

    def __init__(self, tracer: Any) -> None:
        self.sdk = tracer
        self.sampler = tracer.sampler
        self._multi = tracer.span_processor
        self._seen: tuple[Any, ...] | None = None  # the processors last checked
        # The SDK's samplers hand back the attributes amqpkit built (valid by construction); another sampler may
        # add its own, which are then checked as the SDK's span checks them.
        self._trusted = _passes_attributes(tracer.sampler)
        ratio = _ratio_root(tracer.sampler)  # asked once: the root's placeholder below and this go together
        self._static = _static_decisions(tracer.sampler, ratio)
        self._ratio_root = ratio if self._static is not None else None
        self._lean = False

    def _check(self, processors: tuple[Any, ...]) -> bool:
        tracer = self.sdk
        limits = tracer._span_limits
        self._seen = processors
        self._lean = (
            type(self._multi) is sdk_trace.SynchronousMultiSpanProcessor
            and all(type(p) in _PROCESSORS_KNOWN for p in processors)
            and type(tracer._tracer_metrics).__name__ == "NoOpTracerMetrics"
            and (limits.max_span_attributes is None or limits.max_span_attributes >= ATTRIBUTES_NEEDED)
            and limits.max_span_attribute_length is None
        )
        return self._lean

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] | None = None,
    ) -> trace.Span:
        """As ``Tracer.start_span`` (no start time: now)."""
        tracer = self.sdk
        processors = self._multi._span_processors
        if not (self._lean if processors is self._seen else self._check(processors)) or not tracer._is_enabled():
            return tracer.start_span(name, context, kind, attributes, links)  # type: ignore[no-any-return]
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        return self._start(name, context, parent, kind, attributes, links)

    def start_child(
        self,
        name: str,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, Any] | None,
        links: Sequence[Link] | None,
    ) -> trace.Span:
        """``start_span`` with the parent given as a span context (None: a new trace), as a delivery brings it.

        The same span as ``start_span(name, in_context(parent), ...)``; the Context is built only for a sampler
        that is asked, or for the SDK's tracer.
        """
        tracer = self.sdk
        processors = self._multi._span_processors
        if not (self._lean if processors is self._seen else self._check(processors)) or not tracer._is_enabled():
            return tracer.start_span(name, in_context(parent), kind, attributes, links)  # type: ignore[no-any-return]
        return self._start(name, _FROM_PARENT, parent, kind, attributes, links)

    def _start(
        self,
        name: str,
        context: Context | None,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, Any] | None,
        links: Sequence[Link] | None,
    ) -> trace.Span:
        """A lean span under ``parent``; ``context`` is the one it came in (None: the current one), or
        :data:`_FROM_PARENT` when it came without one."""
        tracer = self.sdk
        links = links or ()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = tracer.id_generator.generate_trace_id()
            random = tracer.id_generator.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random = parent.trace_flags.random_trace_id
        static = self._static
        if static is not None:  # ParentBased over the SDK's fixed decisions: what its should_sample would say
            if parent is None:
                ratio = self._ratio_root
                if ratio is None:
                    (sampled, recording), trace_state = static[0], None
                else:  # as TraceIdRatioBased.should_sample: the trace id's low 64 bits against the bound
                    sampled = recording = trace_id & ratio.TRACE_ID_LIMIT < ratio.bound
                    trace_state = None
            else:
                sampled, recording = static[(1 if parent.is_remote else 3) + (0 if parent.trace_flags.sampled else 1)]
                trace_state = parent.trace_state
            given, trusted = attributes or {}, True
        else:
            if context is _FROM_PARENT:  # start_child: the sampler reads the parent from a Context
                context = in_context(parent)
            sampling = self.sampler.should_sample(context, trace_id, name, kind, attributes, links)
            decision = sampling.decision
            sampled, recording, trace_state = decision.is_sampled(), decision.is_recording(), sampling.trace_state
            given, trusted = sampling.attributes, self._trusted
        span_context = SpanContext(trace_id, tracer.id_generator.generate_span_id(), False,
                                   _FLAGS[sampled, bool(random)], trace_state)  # fmt: skip
        if not recording:
            return NonRecordingSpan(span_context)
        kept: Any = dict(given) if trusted else _span_attributes(tracer._span_limits, given)
        return LeanSpan(self, name, span_context, parent, kind, kept, links)


class LeanSpan(trace.Span, ReadableSpan):
    """A recording span that is also the ``ReadableSpan`` its processors get when it ends."""

    def __init__(
        self,
        lean: LeanTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Any,
        links: Sequence[Link],
    ) -> None:
        # ReadableSpan's own __init__ sets its fields, so that any an SDK release adds are there for exporters
        tracer = lean.sdk
        limits = tracer._span_limits
        ReadableSpan.__init__(
            self,
            name=name,
            context=context,
            parent=parent,
            resource=tracer.resource,
            attributes=attributes,  # a plain dict (see LeanTracer) until a handler adds to it
            links=_bounded_links(limits, links) if links else (),
            kind=kind,
            instrumentation_info=tracer.instrumentation_info,
            instrumentation_scope=tracer._instrumentation_scope,
        )
        self._span_limits = limits
        self._status = _UNSET
        self._end_time: int | None = None
        self._multi = lean._multi
        self._start_time = time_ns()

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name="{self._name}", context={self._context})'

    def get_span_context(self) -> SpanContext:
        return cast(SpanContext, self._context)  # optional in ReadableSpan; a started span always has one

    def is_recording(self) -> bool:
        return self._end_time is None

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            log.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time if end_time is not None else time_ns()
        if type(self._attributes) is BoundedAttributes:
            self._attributes._immutable = True
        # The processors of now, as the SDK's span tells them: one added while the span was open sees it end too
        # (its on_end; an _on_ending of its own is not called).
        for processor in self._multi._span_processors:
            processor.on_end(self)

    def _ended(self, what: str) -> bool:
        if self._end_time is None:
            return False
        log.warning("Tried to %s on an ended span.", what)
        return True

    def _bounded(self) -> BoundedAttributes:
        if type(self._attributes) is not BoundedAttributes:
            self._attributes = _span_attributes(self._span_limits, self._attributes)
        return self._attributes

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if not self._ended("set attributes"):
            self._bounded()._set_items(attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        if not self._ended("set an attribute"):
            self._bounded()[key] = value

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None) -> None:
        if self._ended("add an event"):
            return
        limits = self._span_limits
        if type(self._events) is not BoundedList:
            self._events = BoundedList(limits.max_events)
        bounded = BoundedAttributes(limits.max_event_attributes, attributes, immutable=True,
                                    max_value_len=limits.max_attribute_length)  # fmt: skip
        self._events.append(Event(name, bounded, timestamp))

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        if self._ended("add a link") or not _valid_link(context, attributes):
            return
        if type(self._links) is not BoundedList:
            self._links = BoundedList.from_seq(self._span_limits.max_links, self._links)
        self._links.extend(_bounded_links(self._span_limits, [Link(context, attributes)]))

    def update_name(self, name: str) -> None:
        if not self._ended("update the name"):
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended("set the status"):
            return
        if self._status.status_code is StatusCode.OK:
            return  # OK is final
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        recorded: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)


def _span_attributes(limits: Any, attributes: Mapping[str, Any] | None) -> BoundedAttributes:
    """``attributes`` checked and bounded as the SDK's span keeps its own, with the tracer's ``limits``."""
    return BoundedAttributes(limits.max_span_attributes, attributes, immutable=False,
                             max_value_len=limits.max_span_attribute_length)  # fmt: skip


def _bounded_links(limits: Any, links: Sequence[Link]) -> BoundedList[Link]:
    """``links`` as the SDK keeps them: each one's attributes bounded, at most ``max_links`` of them."""
    kept = []
    for link in links:
        if _valid_link(link.context, link.attributes):
            kept.append(Link(link.context, BoundedAttributes(limits.max_link_attributes, link.attributes,
                                                             immutable=True,
                                                             max_value_len=limits.max_attribute_length)))  # fmt: skip
    return BoundedList.from_seq(limits.max_links, kept)


def _valid_link(context: SpanContext | None, attributes: Mapping[str, Any] | None) -> bool:
    """Whether the SDK keeps a link: a valid context, or one that carries attributes or a trace state."""
    return context is not None and (context.is_valid or bool(attributes) or bool(context.trace_state))


def _passes_attributes(sampler: Any) -> bool:
    """Whether ``sampler`` is one of the SDK's own, which return the attributes they are given, unchanged."""
    if type(sampler).__module__ != sdk_sampling.__name__:
        return False
    if isinstance(sampler, ParentBased):
        return all(_passes_attributes(getattr(sampler, name, None)) for name in _PARENT_BASED_DELEGATES)
    return isinstance(sampler, (StaticSampler, TraceIdRatioBased))


_PARENT_BASED_DELEGATES = ("_root", "_remote_parent_sampled", "_remote_parent_not_sampled", "_local_parent_sampled",
                           "_local_parent_not_sampled")  # fmt: skip


def _static_decisions(sampler: Any, ratio_root: TraceIdRatioBased | None) -> tuple[tuple[bool, bool], ...] | None:
    """For a ``ParentBased`` whose delegates are all the SDK's ``StaticSampler`` and whose root is one too (as the
    SDK's default sampler's is) or ``ratio_root``, the sampler's root when :func:`_ratio_root` accepted it: each
    one's (sampled, recording), in :data:`_PARENT_BASED_DELEGATES` order, the root's (False, False) when it is the
    ratio (decided per trace id); else None."""
    if type(sampler) not in PARENT_BASED:
        return None
    decisions = []
    for name in _PARENT_BASED_DELEGATES:
        delegate = getattr(sampler, name, None)
        if name == "_root" and ratio_root is not None and delegate is ratio_root:
            decisions.append((False, False))  # decided per trace id, in place
            continue
        decision = getattr(delegate, "_decision", None)
        if type(delegate) is not StaticSampler or not isinstance(decision, Decision):
            return None
        # as Decision.is_sampled and is_recording say
        decisions.append((decision is Decision.RECORD_AND_SAMPLE, decision is not Decision.DROP))
    return tuple(decisions)


def _ratio_root(sampler: Any) -> TraceIdRatioBased | None:
    """The root of a ``ParentBased`` when it is the SDK's own ``TraceIdRatioBased`` (a subclass is asked) and decides
    as :meth:`LeanTracer._start` would (the trace id's low 64 bits below the bound), else None.

    The rule is checked against the sampler itself for trace ids on both sides of its bound and with high bits set,
    so that a release deciding otherwise (a different threshold, say) is asked, not mimicked.
    """
    root = getattr(sampler, "_root", None)
    if type(root) is not TraceIdRatioBased:
        return None
    limit, bound = getattr(root, "TRACE_ID_LIMIT", None), getattr(root, "bound", None)
    if not isinstance(limit, int) or not isinstance(bound, int):
        return None
    probes = {1, limit, max(bound - 1, 1), max(min(bound, limit), 1), min(bound + 1, limit)}
    probes |= {(5 << 64) | probe for probe in probes}
    try:
        for trace_id in probes:
            decision = root.should_sample(None, trace_id, "probe").decision
            if decision is not (Decision.RECORD_AND_SAMPLE if trace_id & limit < bound else Decision.DROP):
                return None
    except Exception:  # a sampler that cannot answer a probe is asked, per span, as it always was
        return None
    return root


def _release() -> tuple[int, int]:
    """The installed opentelemetry-sdk's (major, minor), or (0, 0) when it cannot be read."""
    try:
        from opentelemetry.sdk.version import __version__

        major, minor = __version__.split(".")[:2]
        return int(major), int(minor)
    except (ImportError, ValueError):
        return 0, 0
