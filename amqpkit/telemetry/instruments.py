"""The tracer and the metric instruments of one :func:`~amqpkit.telemetry.instrument` call.

The per-message counts are plain sums (:class:`Tally`) that the SDK reads when it collects, through
observable instruments; the two per-message durations go to their histograms in runs (:class:`Durations`);
the rest are plain counters. :data:`METRICS` lists every metric.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Histogram, Observation
from opentelemetry.sdk.trace.sampling import Decision, StaticSampler
from opentelemetry.trace import SpanContext

from .._version import __version__
from .lean import PARENT_BASED, lean_tracer
from .propagation import in_context
from .routes import ROUTES_KEPT, CallRoute, ProcessRoute, SendRoute

if TYPE_CHECKING:
    from .lean_histogram import LeanHistogram

METRICS = {
    "messaging.client.sent.messages": "messages published (counter)",
    "messaging.client.consumed.messages": "messages handed to a consumer (counter)",
    "messaging.process.duration": "handler duration, seconds (histogram)",
    "amqpkit.messages.acked": "deliveries acked by their handler (counter)",
    "amqpkit.messages.nacked": "deliveries nacked, requeued or rejected (counter; amqpkit.settlement says which)",
    "amqpkit.messages.in_flight": "deliveries whose handler is running (up-down counter)",
    "amqpkit.tasks.retried": "work-queue tasks sent to a delay queue for another attempt (counter)",
    "amqpkit.tasks.dead_lettered": "work-queue tasks sent to their DLQ (counter)",
    "amqpkit.rpc.client.duration": "RPC call duration, seconds, by amqpkit.rpc.outcome (histogram)",
    "amqpkit.connection.reconnects": "reconnects after a lost connection (counter)",
    "amqpkit.connection.disconnected.time": "seconds spent disconnected before each reconnect (counter)",
}


class Instruments:
    """The tracer, the metric instruments and the routes of one :func:`~amqpkit.telemetry.instrument` call."""

    def __init__(self, tracer_provider: Any, meter_provider: Any) -> None:
        tracer = trace.get_tracer("amqpkit", __version__, tracer_provider=tracer_provider)
        self.tracer: Any
        self.start_child: Callable[..., trace.Span]
        self.drops_unsampled: bool
        if type(tracer) is trace.ProxyTracer:  # the global provider is not set yet: see AwaitingProvider
            self.use(AwaitingProvider(self, tracer))
        else:
            self.use(tracer)
        meter = metrics.get_meter("amqpkit", __version__, meter_provider=meter_provider)
        self.process_duration = Durations(meter.create_histogram("messaging.process.duration", "s", "handler duration"))
        self.rpc_duration = Durations(meter.create_histogram("amqpkit.rpc.client.duration", "s", "RPC call duration"))
        # The per-message counts are plain sums here, read by the SDK when it collects (observable
        # instruments): a delivery costs a dict update instead of an SDK measurement each. The first one's
        # callbacks also hand the durations still waiting to their histograms, before the SDK reads those.
        self.published = Tally()
        self.consumed = Tally()
        self.acked = Tally()
        self.nacked = Tally()
        self.in_flight = Tally()
        for name, unit, description, tally, counter in (
            ("messaging.client.sent.messages", "{message}", "messages published", self.published, True),
            ("messaging.client.consumed.messages", "{message}", "messages handed to a consumer", self.consumed, True),
            ("amqpkit.messages.acked", "{message}", "deliveries acked", self.acked, True),
            ("amqpkit.messages.nacked", "{message}", "deliveries nacked, requeued or rejected", self.nacked, True),
            ("amqpkit.messages.in_flight", "{message}", "deliveries whose handler is running", self.in_flight, False),
        ):
            create = meter.create_observable_counter if counter else meter.create_observable_up_down_counter
            create(name, [self.flush, tally.observe] if tally is self.published else [tally.observe], unit, description)
        self.retried = meter.create_counter("amqpkit.tasks.retried", "{task}", "tasks sent back for another attempt")
        self.dead_lettered = meter.create_counter("amqpkit.tasks.dead_lettered", "{task}", "tasks sent to their DLQ")
        self.reconnects = meter.create_counter("amqpkit.connection.reconnects", "{reconnect}", "reconnects")
        self.disconnected_time = meter.create_counter(
            "amqpkit.connection.disconnected.time", "s", "time spent disconnected before a reconnect"
        )
        self.send_routes: dict[tuple[str, str], SendRoute] = {}
        self.process_routes: dict[tuple[str, str, str, str | None, bool], ProcessRoute] = {}
        self.call_routes: dict[tuple[str, str, str | None, str], CallRoute] = {}

    def use(self, tracer: Any) -> None:
        """Start spans with ``tracer``: the SDK's own gets amqpkit's lean spans where they are the same as the SDK's
        (see .lean)."""
        lean = lean_tracer(tracer)
        self.tracer = lean or tracer
        self.start_child = lean.start_child if lean is not None else partial(_child, tracer)
        self.drops_unsampled = drops_unsampled_children(self.tracer)

    def flush(self, options: CallbackOptions | None = None) -> list[Observation]:
        """Hand the waiting durations to their histograms (an observable instrument's callback: it observes none)."""
        self.process_duration.flush()
        self.rpc_duration.flush()
        return []

    def send_route(self, exchange: str, routing_key: str) -> SendRoute:
        if len(self.send_routes) >= ROUTES_KEPT:
            self.send_routes = {}
        route = self.send_routes[exchange, routing_key] = SendRoute(self, exchange, routing_key)
        return route

    def process_route(self, key: tuple[str, str, str, str | None, bool]) -> ProcessRoute:
        if len(self.process_routes) >= ROUTES_KEPT:
            self.process_routes = {}
        route = self.process_routes[key] = ProcessRoute(self, *key)
        return route

    def call_route(self, key: tuple[str, str, str | None, str]) -> CallRoute:
        if len(self.call_routes) >= ROUTES_KEPT:
            self.call_routes = {}
        route = self.call_routes[key] = CallRoute(*key)
        return route


class AwaitingProvider:
    """The tracer of an ``instrument()`` that came before the application set its global tracer provider.

    OpenTelemetry's proxy tracer makes no-op spans until a provider is set and then hands every span to that
    provider's tracer, one call further away. This stands in for it: each span first looks whether a provider
    is set now, and the first one that finds it makes the :class:`Instruments` use that provider's tracer from
    then on, as if ``instrument()`` had come after it (lean spans, unsampled children known to be dropped).
    """

    def __init__(self, instruments: Instruments, proxy: Any) -> None:
        self.instruments = instruments
        self.proxy = proxy

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        provider = trace.get_tracer_provider()
        if type(provider) is trace.ProxyTracerProvider:  # none yet: the proxy's no-op span
            return self.proxy.start_span(*args, **kwargs)  # type: ignore[no-any-return]
        self.instruments.use(provider.get_tracer("amqpkit", __version__))
        return self.instruments.tracer.start_span(*args, **kwargs)  # type: ignore[no-any-return]


def _child(tracer: Any, name: str, parent: SpanContext | None, *kind_attributes_links: Any) -> trace.Span:
    """:meth:`.lean.LeanTracer.start_child` for a tracer lean spans do not stand in for."""
    return tracer.start_span(name, in_context(parent), *kind_attributes_links)  # type: ignore[no-any-return]


def drops_unsampled_children(tracer: Any) -> bool:
    """Whether ``tracer`` is known to drop every span whose parent was not sampled.

    True for the SDK's default sampler and for ``ParentBased(root)`` (or the SDK's ``ParentBasedTraceIdRatio``)
    with its default delegates (``ALWAYS_OFF`` for a remote and for a local parent not sampled). A message whose
    context is not sampled then needs no span of its own: the hooks pass the context on as it came, and ask the
    SDK for nothing. Any other sampler (a subclass of the user's own, a delegate of the user's own) is asked, as
    before.
    """
    sampler = getattr(tracer, "sampler", None)
    if type(sampler) not in PARENT_BASED:
        return False
    for delegate in (getattr(sampler, "_remote_parent_not_sampled", None),
                     getattr(sampler, "_local_parent_not_sampled", None)):  # fmt: skip
        if not isinstance(delegate, StaticSampler) or getattr(delegate, "_decision", None) is not Decision.DROP:
            return False
    return True


RUN = 64
"""How many durations :class:`Durations` keeps before it hands them to the SDK."""


class Durations:
    """A histogram's measurements, handed to the SDK in runs of :data:`RUN`, and all at once when it collects.

    One ``Histogram.record`` is some thirty Python calls in the SDK (the attributes checked and hashed, the
    exemplar filter asked, the buckets updated under a lock): 11-14 µs back to back, but 46 µs a message in a
    consuming process at full speed, where each call finds the interpreter's caches full of the broker's frames
    (py-spy; docs/observability-cost-rounds.md). So each measurement waits here, with the context it was made in (for
    exemplars), until :data:`RUN` have come or the SDK collects: :meth:`Instruments.flush` is an observable
    instrument's callback, and the SDK runs those before it reads the histograms, so every collection sees
    every duration measured before it. A run goes into the SDK's aggregations at once where
    :mod:`.lean_histogram` can stand in for ``record``, and through ``record``, one by one, otherwise. One thing
    differs from recording at once: an exemplar's timestamp is the time of the run, not of the measurement.
    """

    __slots__ = ("awaiting", "histogram", "lean", "pending", "with_context")

    def __init__(self, histogram: Histogram) -> None:
        self.pending: deque[tuple[float, Mapping[str, Any], Context]] = deque()
        self.use(histogram)
        # OpenTelemetry's proxy (instrument() came before the global meter provider was set): until it has the
        # provider's own histogram, which flush then uses directly
        self.awaiting = type(histogram).__name__ == "_ProxyHistogram"

    def use(self, histogram: Histogram) -> None:
        self.histogram = histogram
        # SDK releases before 1.28 take no context (and keep no exemplars)
        self.with_context = "context" in inspect.signature(histogram.record).parameters
        self.lean = _lean(histogram)

    def record(self, seconds: float, attributes: Mapping[str, Any], context: Context) -> None:
        pending = self.pending
        pending.append((seconds, attributes, context))
        if len(pending) >= RUN:
            self.flush()

    def flush(self) -> None:
        """Hand on every waiting measurement (from any thread; a deque's ``popleft`` takes each one once)."""
        take = self.pending.popleft
        run = []
        while True:
            try:
                run.append(take())
            except IndexError:
                break
        if not run:
            return
        if self.awaiting and (real := getattr(self.histogram, "_real_instrument", None)) is not None:
            self.awaiting = False
            self.use(real)
        lean = self.lean
        # as record takes them: finite, not negative (record warns about any other and drops it)
        if (lean is not None and (matches := lean.matches()) is not None
                and all(value >= 0 and math.isfinite(value) for value, _, _ in run)):  # fmt: skip
            lean.merge(run, matches)
            return
        record, with_context = self.histogram.record, self.with_context
        for seconds, attributes, context in run:
            if with_context:
                record(seconds, attributes, context)
            else:
                record(seconds, attributes)


def _lean(histogram: Histogram) -> LeanHistogram | None:
    try:
        from .lean_histogram import lean_histogram
    except ImportError:  # an SDK release without the internals lean histograms merge into
        return None
    return lean_histogram(histogram)


class Tally:
    """Sums by attribute set, observed by the SDK at collection time.

    Each attribute set has a one-item list (:meth:`cell`) that the hooks keep
    in their per-destination routes, so a count is ``cell[0] += 1``.
    """

    #: Attribute sets kept at most; later ones share one with ``otel.metric.overflow=True``, as OpenTelemetry's
    #: SDK does past its own cardinality limit (2,000 by default, this one's included). Without it one cell was
    #: kept for every exchange name ever published to (a hunt: 1,891 after 4 minutes of short-lived exchanges,
    #: each observed at every collection).
    LIMIT = 1999
    OVERFLOW = cast(tuple[tuple[str, str], ...], (("otel.metric.overflow", True),))

    def __init__(self) -> None:
        self.values: dict[tuple[tuple[str, str], ...], list[float]] = {}

    def cell(self, key: tuple[tuple[str, str], ...]) -> list[float]:
        found = self.values.get(key)
        if found is None:
            if len(self.values) >= self.LIMIT:
                key = self.OVERFLOW
            found = self.values.setdefault(key, [0])
        return found

    def add(self, amount: float, key: tuple[tuple[str, str], ...]) -> None:
        self.cell(key)[0] += amount

    def observe(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(cell[0], dict(key)) for key, cell in list(self.values.items())]  # a copy: another thread
