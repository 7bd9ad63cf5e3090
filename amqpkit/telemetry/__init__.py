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

Metrics go through the OpenTelemetry metrics API (:data:`METRICS` lists them).
Log records made while a span is current get ``trace_id`` and ``span_id``
attributes, and amqpkit's JSON log lines show them.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
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


class _Tally:
    """Sums by attribute set, observed by the SDK at collection time."""

    def __init__(self) -> None:
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def add(self, amount: float, key: tuple[tuple[str, str], ...]) -> None:
        self.values[key] = self.values.get(key, 0) + amount

    def observe(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(value, dict(key)) for key, value in dict(self.values).items()]  # a copy: another thread


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
    if "traceparent" not in headers:
        return _EMPTY
    ctx = _PROPAGATOR.extract(headers, context=_EMPTY, getter=_GETTER)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        shown = str(headers.get("traceparent"))[:80]
        log.debug("ignored a malformed traceparent header %r; the message starts a new trace", shown)
        return _EMPTY
    return ctx


def _traceparent(span: Span) -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
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
    exchange_name = exchange if isinstance(exchange, str) else exchange.name
    if state is None:  # uninstrumented meanwhile
        await _quiet_publish(broker, envelope, exchange, routing_key, mandatory, confirm, timeout)
        return
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": exchange_name,
        "messaging.message.body.size": len(envelope.body),
    }
    if routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
    if envelope.message_id:
        attributes["messaging.message.id"] = envelope.message_id
    if envelope.correlation_id:
        attributes["messaging.message.conversation_id"] = envelope.correlation_id
    span = state.tracer.start_span(
        f"send {_destination(exchange_name, routing_key)}", kind=SpanKind.PRODUCER, attributes=attributes
    )
    headers = dict(envelope.headers)
    headers.pop("tracestate", None)  # a forwarded copy's old state; the new span's own is injected
    _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
    try:
        await _quiet_publish(broker, replace(envelope, headers=headers), exchange, routing_key, mandatory, confirm,
                             timeout)  # fmt: skip
    except BaseException as exc:
        _fail(span, exc)
        raise
    finally:
        span.end()
    state.published.add(1, (("messaging.destination.name", exchange_name), ("messaging.system", "rabbitmq")))


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
    parent = extract(headers)
    queue = consumer.queue_name
    # A server-named queue (a private subscription's amq.gen-...) is one of many: names and metrics use the exchange.
    target = queue if not queue.startswith("amq.") else (delivery.exchange or "(default)")
    props = delivery._properties
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": delivery.exchange,
        "messaging.destination.subscription.name": queue,
        "messaging.message.body.size": len(delivery.body),
        "messaging.rabbitmq.message.delivery_tag": delivery.delivery_tag,
    }
    if delivery.routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = delivery.routing_key
    if props.message_id:
        attributes["messaging.message.id"] = props.message_id
    if props.correlation_id:
        attributes["messaging.message.conversation_id"] = props.correlation_id
    if isinstance(owner, RpcServer):
        method = props.message_type or ""
        attributes["rpc.service"] = queue
        attributes["rpc.method"] = method
        name, kind = (f"{queue}/{method}" if method else queue), SpanKind.SERVER
    else:
        name, kind = f"process {target}", SpanKind.CONSUMER
        attempt = headers.get("x-attempt")
        if attempt is not None:
            attributes["amqpkit.task.attempt"] = _as_int(attempt)
    span = state.tracer.start_span(name, parent, kind, attributes, _link_to_first(headers))
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    quiet = _QUIET.set(False)
    key = (("messaging.destination.subscription.name", target), ("messaging.system", "rabbitmq"))
    state.consumed.add(1, key)
    state.in_flight.add(1, key)
    started = time.perf_counter()
    try:
        await consumer.callback(delivery)
    except BaseException as exc:
        _fail(span, exc)
        raise
    finally:
        state.process_duration.record(time.perf_counter() - started, dict(key))
        state.in_flight.add(-1, key)
        settled = delivery.settled
        if settled is Settlement.ACKED:
            state.acked.add(1, key)
        elif settled is not None and settled is not Settlement.AUTO:
            state.nacked.add(1, (("amqpkit.settlement", settled.value), *key))
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
    queue = client.routing_key
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": client.exchange,
        "rpc.service": queue,
        "rpc.method": method or "",
        "amqpkit.rpc.reply_queue": client.reply_queue,
    }
    if queue:
        attributes["messaging.rabbitmq.destination.routing_key"] = queue
    span = state.tracer.start_span(f"{queue}/{method}" if method else queue, kind=SpanKind.CLIENT,
                                   attributes=attributes)  # fmt: skip
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
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
        state.rpc_duration.record(
            time.perf_counter() - started,
            {"rpc.service": queue, "rpc.method": method or "", "amqpkit.rpc.outcome": outcome},
        )
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
