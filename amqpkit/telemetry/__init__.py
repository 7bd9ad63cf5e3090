"""OpenTelemetry for amqpkit: traces across publish, consume, RPC and work queues; metrics; trace ids in logs.

Install the extra (``pip install 'amqpkit[otel]'``), then, once per process::

    from amqpkit.telemetry import instrument
    instrument()  # the global tracer and meter providers, or pass your own

Every Broker and pattern in the process is traced from then on, and
:func:`uninstrument` turns it off again. Without the extra nothing here is
imported: the core calls a handful of hooks in :mod:`amqpkit._hooks` that are
``None`` until :func:`instrument` sets them.

What is traced, following OpenTelemetry's messaging semantic conventions
(``messaging.system`` is ``rabbitmq``; the destination is the exchange):

- ``Broker.publish``: a PRODUCER span ``send <exchange>`` (the queue's name for
  the default exchange); W3C ``traceparent``/``tracestate`` go into the
  message's headers.
- every delivery a consumer takes (Subscriber, Worker, ``Broker.consume``): a
  CONSUMER span ``process <queue>`` whose parent is the context the message
  carries; a message without one starts a new trace, and a malformed
  ``traceparent`` is ignored (logged at DEBUG).
- ``RpcClient.call``: a CLIENT span ``<queue>/<method>`` that the reply ends;
  the RpcServer runs the handler in a SERVER span under it.
- a work-queue task: each attempt is its own CONSUMER span; a failed attempt
  says so (``error.type``), the copy sent to the delay queue or the DLQ is a
  PRODUCER span under it, so the trace runs through every retry into the
  DLQ, and attempts after the first carry a link to the first attempt's span
  (the ``x-trace-first-attempt`` header).
- an outbox row (:class:`~amqpkit.outbox.Outbox`): ``add`` stores the current
  trace context in the row's headers, and the relay, later and from a task of
  its own, publishes the row as a child of that span; so the PRODUCER span
  and every consumer's span stay in the trace of the request that wrote it.

Sampling: the sampler is shown, at each span's start, the attributes the semantic conventions call
sampling-relevant (system, operation, destination, routing key, subscription, RPC service and method). A span
the sampler drops still carries the trace context on (its message is counted and its logs get the ids), but
amqpkit builds none of the message's own attributes for it, so a ratio sampler makes the tracing cost
proportional. A destination whose last span recorded gets the next one's attributes in one pass at its start.

Metrics go through the OpenTelemetry metrics API (:data:`METRICS` lists them).
Log records made while a span is current get ``trace_id`` and ``span_id``
attributes, and amqpkit's JSON log lines show them.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import fields
from operator import attrgetter
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.context import Context
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.trace import Link, Span, SpanContext, SpanKind, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("amqpkit.telemetry needs OpenTelemetry: pip install 'amqpkit[otel]'") from exc

from .. import _hooks
from .._version import __version__
from ..connection import Broker, Consumer
from ..message import Delivery, Envelope, Settlement
from ..patterns.rpc import RpcClient, RpcServer
from ..topology import Exchange

__all__ = [
    "FIRST_ATTEMPT_HEADER",
    "METRICS",
    "MetricsServer",
    "extract",
    "instrument",
    "instrumented",
    "serve_metrics",
    "uninstrument",
]

log = logging.getLogger("amqpkit.telemetry")

FIRST_ATTEMPT_HEADER = "x-trace-first-attempt"
"""A retried task's header: the ``traceparent`` of its first attempt's span, which later attempts link to."""

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

_PROPAGATOR = TraceContextTextMapPropagator()
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("amqpkit_telemetry_quiet", default=False)
_EMPTY = Context()


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


class _Instruments:
    """The tracer and the metric instruments of one :func:`instrument` call."""

    def __init__(self, tracer_provider: Any, meter_provider: Any) -> None:
        self.tracer = trace.get_tracer("amqpkit", __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter("amqpkit", __version__, meter_provider=meter_provider)
        # The per-message counts are plain sums here, read by the SDK when it collects (observable
        # instruments): a delivery costs a dict update instead of an SDK measurement each.
        self.published = _Tally()
        self.consumed = _Tally()
        self.acked = _Tally()
        self.nacked = _Tally()
        self.in_flight = _Tally()
        for name, unit, description, tally, counter in (
            ("messaging.client.sent.messages", "{message}", "messages published", self.published, True),
            ("messaging.client.consumed.messages", "{message}", "messages handed to a consumer", self.consumed, True),
            ("amqpkit.messages.acked", "{message}", "deliveries acked", self.acked, True),
            ("amqpkit.messages.nacked", "{message}", "deliveries nacked, requeued or rejected", self.nacked, True),
            ("amqpkit.messages.in_flight", "{message}", "deliveries whose handler is running", self.in_flight, False),
        ):
            create = meter.create_observable_counter if counter else meter.create_observable_up_down_counter
            create(name, [tally.observe], unit, description)
        self.process_duration = meter.create_histogram("messaging.process.duration", "s", "handler duration")
        self.retried = meter.create_counter("amqpkit.tasks.retried", "{task}", "tasks sent back for another attempt")
        self.dead_lettered = meter.create_counter("amqpkit.tasks.dead_lettered", "{task}", "tasks sent to their DLQ")
        self.rpc_duration = meter.create_histogram("amqpkit.rpc.client.duration", "s", "RPC call duration")
        self.reconnects = meter.create_counter("amqpkit.connection.reconnects", "{reconnect}", "reconnects")
        self.disconnected_time = meter.create_counter(
            "amqpkit.connection.disconnected.time", "s", "time spent disconnected before a reconnect"
        )
        self.send_routes: dict[tuple[str, str], _SendRoute] = {}
        self.process_routes: dict[tuple[str, str, str, str | None, bool], _ProcessRoute] = {}
        self.call_routes: dict[tuple[str, str, str | None, str], _CallRoute] = {}

    def send_route(self, exchange: str, routing_key: str) -> _SendRoute:
        if len(self.send_routes) >= _ROUTES_KEPT:
            self.send_routes = {}
        route = self.send_routes[exchange, routing_key] = _SendRoute(self, exchange, routing_key)
        return route

    def process_route(self, key: tuple[str, str, str, str | None, bool]) -> _ProcessRoute:
        if len(self.process_routes) >= _ROUTES_KEPT:
            self.process_routes = {}
        route = self.process_routes[key] = _ProcessRoute(self, *key)
        return route

    def call_route(self, key: tuple[str, str, str | None, str]) -> _CallRoute:
        if len(self.call_routes) >= _ROUTES_KEPT:
            self.call_routes = {}
        route = self.call_routes[key] = _CallRoute(*key)
        return route


class _Tally:
    """Sums by attribute set, observed by the SDK at collection time.

    Each attribute set has a one-item list (:meth:`cell`) that the hooks keep
    in their per-destination routes, so a count is ``cell[0] += 1``.
    """

    def __init__(self) -> None:
        self.values: dict[tuple[tuple[str, str], ...], list[float]] = {}

    def cell(self, key: tuple[tuple[str, str], ...]) -> list[float]:
        found = self.values.get(key)
        if found is None:
            found = self.values.setdefault(key, [0])
        return found

    def add(self, amount: float, key: tuple[tuple[str, str], ...]) -> None:
        self.cell(key)[0] += amount

    def observe(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(cell[0], dict(key)) for key, cell in list(self.values.items())]  # a copy: another thread


_ROUTES_KEPT = 1024
"""Routes (names, attributes and metric cells per destination) kept per kind; past that the cache starts over."""


class _SendRoute:
    """What every publish to one (exchange, routing key) shares: span name, attributes known before sampling."""

    __slots__ = ("attributes", "name", "published", "recording")

    def __init__(self, state: _Instruments, exchange: str, routing_key: str) -> None:
        self.name = f"send {_destination(exchange, routing_key)}"
        self.attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": exchange,
        }
        if routing_key:
            self.attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
        self.recording = False  # whether the last span recorded (see _publish)
        self.published = state.published.cell(
            (("messaging.destination.name", exchange), ("messaging.system", "rabbitmq"))
        )


class _ProcessRoute:
    """What every delivery from one queue, exchange and routing key (and RPC method) shares."""

    __slots__ = ("acked", "attributes", "consumed", "duration_attributes", "in_flight", "key", "kind", "name",
                 "recording", "task")  # fmt: skip

    def __init__(
        self, state: _Instruments, queue: str, exchange: str, routing_key: str, method: str | None, server: bool
    ) -> None:
        # A server-named queue (a private subscription's amq.gen-...) is one of many: names and metrics use the
        # exchange.
        target = queue if not queue.startswith("amq.") else (exchange or "(default)")
        self.attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": exchange,
            "messaging.destination.subscription.name": queue,
        }
        if routing_key:
            self.attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
        if server:
            self.attributes["rpc.service"] = queue
            self.attributes["rpc.method"] = method or ""
            self.name, self.kind = (f"{queue}/{method}" if method else queue), SpanKind.SERVER
        else:
            self.name, self.kind = f"process {target}", SpanKind.CONSUMER
        self.task = not server  # a work-queue attempt number is read from the headers
        self.recording = False  # whether the last span recorded (see _publish)
        self.key = (("messaging.destination.subscription.name", target), ("messaging.system", "rabbitmq"))
        self.duration_attributes = dict(self.key)
        self.consumed = state.consumed.cell(self.key)
        self.in_flight = state.in_flight.cell(self.key)
        self.acked = state.acked.cell(self.key)


class _CallRoute:
    """What every RPC call to one queue and method shares."""

    __slots__ = ("attributes", "method", "name", "outcomes", "service")

    def __init__(self, exchange: str, queue: str, method: str | None, reply_queue: str) -> None:
        self.name = f"{queue}/{method}" if method else queue
        self.service = queue
        self.method = method or ""
        self.attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": exchange,
            "rpc.service": queue,
            "rpc.method": self.method,
            "amqpkit.rpc.reply_queue": reply_queue,
        }
        if queue:
            self.attributes["messaging.rabbitmq.destination.routing_key"] = queue
        self.outcomes: dict[str, dict[str, str]] = {}

    def outcome(self, outcome: str) -> dict[str, str]:
        found = self.outcomes.get(outcome)
        if found is None:
            found = {"rpc.service": self.service, "rpc.method": self.method, "amqpkit.rpc.outcome": outcome}
            if len(self.outcomes) < 64:  # exception class names: few, but not ours to bound
                self.outcomes[outcome] = found
        return found


_state: _Instruments | None = None
_old_record_factory: Any = None


def instrument(tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Trace and measure every Broker and pattern in this process (again, with these providers, if called twice).

    ``None`` uses the global providers (``opentelemetry.trace.set_tracer_provider``
    and ``opentelemetry.metrics.set_meter_provider``).
    """
    global _state, _old_record_factory
    if _state is not None:
        uninstrument()
    _state = _Instruments(tracer_provider, meter_provider)
    _old_record_factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(_record_factory(_old_record_factory))
    _hooks.quiet = _QUIET
    _hooks.publish = _publish
    _hooks.consume = _consume
    _hooks.rpc_call = _rpc_call
    _hooks.handler_failed = _handler_failed
    _hooks.retry = _retry
    _hooks.dead_letter = _dead_letter
    _hooks.outbox_add = _outbox_add
    _hooks.relayed = _relayed
    _hooks.disconnected = _disconnected
    _hooks.reconnected = _reconnected


def uninstrument() -> None:
    """Turn instrumentation off; the core goes back to its uninstrumented path."""
    global _state, _old_record_factory
    _hooks.publish = None
    _hooks.consume = None
    _hooks.rpc_call = None
    _hooks.handler_failed = None
    _hooks.retry = None
    _hooks.dead_letter = None
    _hooks.outbox_add = None
    _hooks.relayed = None
    _hooks.disconnected = None
    _hooks.reconnected = None
    if _old_record_factory is not None:
        logging.setLogRecordFactory(_old_record_factory)
        _old_record_factory = None
    _state = None


def instrumented() -> bool:
    """Whether :func:`instrument` is in effect."""
    return _state is not None


class MetricsServer:
    """What :func:`serve_metrics` started: ``url``, and :meth:`close` to stop serving and stop instrumenting."""

    def __init__(self, httpd: Any, thread: Any, reader: Any, provider: Any, url: str) -> None:
        self._httpd = httpd
        self._thread = thread
        self._reader = reader
        self._provider = provider
        self.url = url

    def close(self) -> None:
        uninstrument()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
        self._provider.shutdown()  # the reader leaves prometheus_client's registry


def serve_metrics(port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve this process's metrics in Prometheus text format on ``http://host:port/metrics``, and instrument.

    Uses ``opentelemetry-exporter-prometheus`` (in the ``otel`` extra); port 0
    picks a free port (see ``url``). Traces go to the global tracer provider.
    """
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        httpd, thread = start_http_server(port, addr=host)
    except BaseException:
        provider.shutdown()
        raise
    url = f"http://{host}:{httpd.server_port}/metrics"
    instrument(meter_provider=provider)
    log.info("metrics in Prometheus text format on %s", url)
    return MetricsServer(httpd, thread, reader, provider, url)


# ---------------------------------------------------------------------- context in headers


def extract(headers: Mapping[str, Any]) -> Context:
    """The trace context a message's headers carry, or an empty context (a new trace) when none or malformed."""
    if headers.get("traceparent") is None:
        return _EMPTY
    ctx = _PROPAGATOR.extract(headers, context=_EMPTY, getter=_GETTER)
    if ctx is _EMPTY:  # the propagator hands back the context it was given when the header does not parse
        shown = str(headers.get("traceparent"))[:80]
        log.debug("ignored a malformed traceparent header %r; the message starts a new trace", shown)
    return ctx


def _inject(span_context: SpanContext, headers: dict[str, Any]) -> None:
    """W3C ``traceparent`` (and ``tracestate``) for ``span_context``, as the W3C propagator writes them.

    Written here rather than through the propagator, which wants the span in a new Context first.
    """
    if span_context.is_valid:
        headers["traceparent"] = (
            f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"
        )
        if span_context.trace_state:
            headers["tracestate"] = span_context.trace_state.to_header()


def _traceparent(span: Span) -> str | None:
    carrier: dict[str, Any] = {}
    _inject(span.get_span_context(), carrier)
    return carrier.get("traceparent")


def _link_to_first(headers: Mapping[str, Any]) -> list[Link] | None:
    value = headers.get(FIRST_ATTEMPT_HEADER)
    if value is None:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": value}, context=_EMPTY, getter=_GETTER)
    first: SpanContext = trace.get_current_span(ctx).get_span_context()
    if not first.is_valid:
        log.debug("ignored a malformed %s header %r", FIRST_ATTEMPT_HEADER, str(value)[:80])
        return None
    return [Link(first, {"amqpkit.link": "first attempt"})]


# ---------------------------------------------------------------------- hooks


def _fail(span: Span, exc: BaseException) -> None:
    if not span.is_recording():
        return
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:300])
    span.record_exception(exc)


def _destination(exchange: str, routing_key: str) -> str:
    if exchange:
        return exchange
    # The default exchange routes by queue name; a server-named queue (amq.gen-..., a reply queue) is
    # one of many, so the span name does not carry it.
    if routing_key and not routing_key.startswith("amq."):
        return routing_key
    return "(default)"


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope) if f.init)
_envelope_values = attrgetter(*_ENVELOPE_FIELDS)
_HEADERS_AT = _ENVELOPE_FIELDS.index("headers")


def _with_headers(envelope: Envelope, headers: dict[str, Any]) -> Envelope:
    """A copy of ``envelope`` with ``headers`` (``dataclasses.replace`` without its per-call field walk)."""
    values = list(_envelope_values(envelope))
    values[_HEADERS_AT] = headers
    return Envelope(*values)


async def _publish(
    broker: Broker,
    envelope: Envelope,
    exchange: str | Exchange,
    routing_key: str,
    mandatory: bool,
    confirm: bool,
    timeout: float | None,
) -> None:
    state = _state
    if state is None:  # uninstrumented meanwhile
        await _quiet_publish(broker, envelope, exchange, routing_key, mandatory, confirm, timeout)
        return
    exchange_name = exchange if isinstance(exchange, str) else exchange.name
    route = state.send_routes.get((exchange_name, routing_key)) or state.send_route(exchange_name, routing_key)
    if route.recording:  # its last span recorded: so will this one, likely; all attributes in one pass
        span = state.tracer.start_span(route.name, kind=SpanKind.PRODUCER,
                                       attributes=_sent(envelope, dict(route.attributes)))  # fmt: skip
        route.recording = span.is_recording()
    else:  # likely sampled out: the sampler sees the attributes known before the message, and only a span
        # that records gets the message's own
        span = state.tracer.start_span(route.name, kind=SpanKind.PRODUCER, attributes=route.attributes)
        if span.is_recording():
            route.recording = True
            span.set_attributes(_sent(envelope, {}))
    headers = dict(envelope.headers)
    headers.pop("tracestate", None)  # a forwarded copy's old state; the new span's own is injected
    _inject(span.get_span_context(), headers)
    try:
        await _quiet_publish(broker, _with_headers(envelope, headers), exchange, routing_key, mandatory, confirm,
                             timeout)  # fmt: skip
    except BaseException as exc:
        _fail(span, exc)
        raise
    finally:
        span.end()
    route.published[0] += 1


def _sent(envelope: Envelope, attributes: dict[str, Any]) -> dict[str, Any]:
    """``attributes`` with the message's own added: size, id, conversation id."""
    attributes["messaging.message.body.size"] = len(envelope.body)
    if envelope.message_id:
        attributes["messaging.message.id"] = envelope.message_id
    if envelope.correlation_id:
        attributes["messaging.message.conversation_id"] = envelope.correlation_id
    return attributes


def _processed(delivery: Delivery[bytes], route: _ProcessRoute, attributes: dict[str, Any]) -> dict[str, Any]:
    """``attributes`` with the delivery's own added: size, delivery tag, id, conversation id, task attempt."""
    props = delivery._properties
    attributes["messaging.message.body.size"] = len(delivery.body)
    attributes["messaging.rabbitmq.message.delivery_tag"] = delivery.delivery_tag
    if props.message_id:
        attributes["messaging.message.id"] = props.message_id
    if props.correlation_id:
        attributes["messaging.message.conversation_id"] = props.correlation_id
    if route.task:
        attempt = delivery.headers.get("x-attempt")
        if attempt is not None:
            attributes["amqpkit.task.attempt"] = _as_int(attempt)
    return attributes


async def _quiet_publish(
    broker: Broker,
    envelope: Envelope,
    exchange: str | Exchange,
    routing_key: str,
    mandatory: bool,
    confirm: bool,
    timeout: float | None,
) -> None:
    token = _QUIET.set(True)
    try:
        await broker.publish(
            envelope, exchange=exchange, routing_key=routing_key, mandatory=mandatory, confirm=confirm, timeout=timeout
        )
    finally:
        _QUIET.reset(token)


async def _consume(consumer: Consumer, delivery: Delivery[bytes]) -> None:
    state = _state
    owner = getattr(consumer.callback, "__self__", None)
    if state is None or isinstance(owner, RpcClient):
        # An RPC reply ends the caller's CLIENT span: no span of its own.
        await consumer.callback(delivery)
        return
    headers = delivery.headers
    props = delivery._properties
    server = isinstance(owner, RpcServer)
    key = (consumer.queue_name, delivery.exchange, delivery.routing_key, props.message_type if server else None, server)
    route = state.process_routes.get(key) or state.process_route(key)
    parent = extract(headers)
    links = _link_to_first(headers)
    if route.recording:  # as in _publish
        attributes = _processed(delivery, route, dict(route.attributes))
        span = state.tracer.start_span(route.name, parent, route.kind, attributes, links)
        route.recording = span.is_recording()
    else:
        span = state.tracer.start_span(route.name, parent, route.kind, route.attributes, links)
        if span.is_recording():
            route.recording = True
            span.set_attributes(_processed(delivery, route, {}))
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    quiet = _QUIET.set(False) if _QUIET.get() else None
    route.consumed[0] += 1
    route.in_flight[0] += 1
    started = time.perf_counter()
    try:
        await consumer.callback(delivery)
    except BaseException as exc:
        _fail(span, exc)
        raise
    finally:
        state.process_duration.record(time.perf_counter() - started, route.duration_attributes)
        route.in_flight[0] -= 1
        settled = delivery.settled
        if settled is Settlement.ACKED:
            route.acked[0] += 1
        elif settled is not None and settled is not Settlement.AUTO:
            state.nacked.add(1, (("amqpkit.settlement", settled.value), *route.key))
        if quiet is not None:
            _QUIET.reset(quiet)
        otel_context.detach(token)
        span.end()


async def _rpc_call(
    client: RpcClient,
    method: str | None,
    payload: Any,
    returns: Any,
    timeout: float | None,
    headers: Mapping[str, Any] | None,
) -> Any:
    state = _state
    carrier: dict[str, Any] = dict(headers) if headers else {}
    if state is None:
        token = _QUIET.set(True)
        try:
            return await client.call(method, payload, returns=returns, timeout=timeout, headers=carrier)
        finally:
            _QUIET.reset(token)
    key = (client.exchange, client.routing_key, method, client.reply_queue)
    route = state.call_routes.get(key) or state.call_route(key)
    span = state.tracer.start_span(route.name, kind=SpanKind.CLIENT, attributes=route.attributes)
    _inject(span.get_span_context(), carrier)
    token = _QUIET.set(True)
    started = time.perf_counter()
    outcome = "ok"
    try:
        return await client.call(method, payload, returns=returns, timeout=timeout, headers=carrier)
    except BaseException as exc:
        outcome = type(exc).__name__
        _fail(span, exc)
        raise
    finally:
        _QUIET.reset(token)
        state.rpc_duration.record(time.perf_counter() - started, route.outcome(outcome))
        span.end()


def _handler_failed(exc: BaseException) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        _fail(span, exc)


def _retry(headers: dict[str, Any], exc: BaseException) -> None:
    state = _state
    span = trace.get_current_span()
    if span.is_recording():
        _fail(span, exc)
        span.set_attribute("amqpkit.task.attempt", _as_int(headers.get("x-attempt")) - 1)
        span.add_event("amqpkit.task.retry", {"amqpkit.task.next_attempt": _as_int(headers.get("x-attempt"))})
        first = _traceparent(span)
        if first is not None:
            headers.setdefault(FIRST_ATTEMPT_HEADER, first)
    if state is not None:
        state.retried.add(1, {"messaging.system": "rabbitmq"})


def _dead_letter(headers: dict[str, Any], reason: str, exc: BaseException) -> None:
    state = _state
    span = trace.get_current_span()
    if span.is_recording():
        _fail(span, exc)
        span.set_attribute("amqpkit.task.attempt", _as_int(headers.get("x-attempts")))
        span.add_event("amqpkit.task.dead_letter", {"amqpkit.task.dead_letter_reason": reason})
        first = _traceparent(span)
        if first is not None:
            headers.setdefault(FIRST_ATTEMPT_HEADER, first)
    if state is not None:
        state.dead_lettered.add(1, {"messaging.system": "rabbitmq", "amqpkit.task.dead_letter_reason": reason})


def _outbox_add(headers: dict[str, Any]) -> None:
    """An outbox row is being stored: it keeps the current span's context for the relay (see ``_relayed``)."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        headers.pop("tracestate", None)  # a forwarded envelope's old state; the current span's own is written
        _inject(span_context, headers)


@contextlib.contextmanager
def _relayed(headers: Mapping[str, Any]) -> Iterator[None]:
    """The relay publishes a row: the context the row carries is current, so the PRODUCER span is its child."""
    parent = extract(headers)
    if parent is _EMPTY:  # a row written with no span current (or before instrumenting): as any publish
        yield
        return
    token = otel_context.attach(parent)
    try:
        yield
    finally:
        otel_context.detach(token)


_disconnected_at: dict[int, float] = {}


def _disconnected(broker: Broker) -> None:
    _disconnected_at.setdefault(id(broker), time.monotonic())


def _reconnected(broker: Broker, seconds: float) -> None:
    state = _state
    since = _disconnected_at.pop(id(broker), None)
    if state is None:
        return
    away = time.monotonic() - since if since is not None else seconds
    state.reconnects.add(1, {"messaging.system": "rabbitmq"})
    state.disconnected_time.add(away, {"messaging.system": "rabbitmq"})


# ---------------------------------------------------------------------- logs


def _record_factory(old: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = old(*args, **kwargs)
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return record

    return factory


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
