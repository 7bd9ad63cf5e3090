"""The hooks :func:`~amqpkit.telemetry.instrument` sets in :mod:`amqpkit._hooks`: spans and counts per message.

``publish``, ``consume`` and ``rpc_call`` wrap the core's own calls (they run once per message: no
indirection is added here); ``handler_failed``, ``retry`` and ``dead_letter`` mark the current span of a
work-queue task; ``outbox_add`` and ``relayed`` carry an outbox row's trace context from the writer to the
relay; ``disconnected`` and ``reconnected`` count reconnects.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
import weakref
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, SpanKind, StatusCode

from ..connection import Broker, Consumer
from ..message import Delivery, Envelope, Settlement, as_int, basic_properties
from ..patterns.rpc import RpcClient, RpcServer
from ..topology import Exchange
from .instruments import Instruments
from .propagation import (
    EMPTY,
    FIRST_ATTEMPT_HEADER,
    extract,
    in_context,
    inject,
    link_to_first,
    remote_parent,
    traceparent,
)
from .routes import ProcessRoute

current: Instruments | None = None
"""The instruments of the :func:`~amqpkit.telemetry.instrument` in effect, or None."""

QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("amqpkit_telemetry_quiet", default=False)
"""True while ``rpc_call`` runs the client's own call (set as :data:`amqpkit._hooks.quiet`): the request's
publish makes no PRODUCER span of its own (the CLIENT span is its send)."""


def _fail(span: Span, exc: BaseException) -> None:
    if not span.is_recording():
        return
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:300])
    span.record_exception(exc)


async def publish(
    broker: Broker,
    envelope: Envelope,
    exchange: str | Exchange,
    routing_key: str,
    mandatory: bool,
    confirm: bool,
    timeout: float | None,
) -> None:
    # Sent through the core below the hook (Broker._publish), with the trace headers written into the properties
    # built for it: no second envelope, no second pass through Broker.publish (nor through a subclass's own).
    state = current
    if state is None:  # uninstrumented meanwhile
        properties = basic_properties(envelope)
        await broker._publish(envelope.body, properties, exchange, routing_key, mandatory, confirm, timeout)
        return
    exchange_name = exchange if isinstance(exchange, str) else exchange.name
    route = state.send_routes.get((exchange_name, routing_key)) or state.send_route(exchange_name, routing_key)
    if state.drops_unsampled:
        parent = trace.get_current_span().get_span_context()
        if parent.is_valid and not parent.trace_flags.sampled:  # the sampler would drop the span: none is made,
            # and the message carries the unsampled context on as it is
            properties = basic_properties(envelope)
            properties.headers = _carrying(properties.headers or {}, parent)
            await broker._publish(envelope.body, properties, exchange, routing_key, mandatory, confirm, timeout)
            route.published[0] += 1
            return
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
    try:  # a message refused before it is sent (InvalidMessage) fails its span too
        properties = basic_properties(envelope)
        properties.headers = _carrying(properties.headers or {}, span.get_span_context())
        await broker._publish(envelope.body, properties, exchange, routing_key, mandatory, confirm, timeout)
    except BaseException as exc:
        _fail(span, exc)
        raise
    finally:
        span.end()
    route.published[0] += 1


def _carrying(headers: Mapping[str, Any], span_context: SpanContext) -> dict[str, Any]:
    """A copy of ``headers`` with the W3C context of ``span_context`` (a forwarded copy's old state replaced).

    ``headers`` are the properties' (floats as doubles, :func:`~amqpkit.message.as_doubles`), not the envelope's."""
    carrier = dict(headers)
    carrier.pop("tracestate", None)
    inject(span_context, carrier)
    return carrier


def _sent(envelope: Envelope, attributes: dict[str, Any]) -> dict[str, Any]:
    """``attributes`` with the message's own added: size, id, conversation id."""
    attributes["messaging.message.body.size"] = len(envelope.body)
    if envelope.message_id:
        attributes["messaging.message.id"] = envelope.message_id
    if envelope.correlation_id:
        attributes["messaging.message.conversation_id"] = envelope.correlation_id
    return attributes


def _processed(delivery: Delivery[bytes], route: ProcessRoute, attributes: dict[str, Any]) -> dict[str, Any]:
    """``attributes`` with the delivery's own added: size, delivery tag, id, conversation id, task attempt."""
    attributes["messaging.message.body.size"] = len(delivery.body)
    attributes["messaging.rabbitmq.message.delivery_tag"] = delivery.delivery_tag
    message_id = delivery.message_id
    if message_id:
        attributes["messaging.message.id"] = message_id
    correlation_id = delivery.correlation_id
    if correlation_id:
        attributes["messaging.message.conversation_id"] = correlation_id
    if route.task:
        attempt = delivery.headers.get("x-attempt")
        if attempt is not None:
            attributes["amqpkit.task.attempt"] = as_int(attempt)
    return attributes


async def consume(consumer: Consumer, delivery: Delivery[bytes]) -> None:
    state = current
    owner = getattr(consumer.callback, "__self__", None)
    if state is None or isinstance(owner, RpcClient):
        # An RPC reply ends the caller's CLIENT span: no span of its own.
        await consumer.callback(delivery)
        return
    headers = delivery.headers
    server = isinstance(owner, RpcServer)
    key = (consumer.queue_name, delivery.exchange, delivery.routing_key, delivery.type if server else None, server)
    route = state.process_routes.get(key) or state.process_route(key)
    parent = remote_parent(headers)
    span: Span | None
    if state.drops_unsampled and parent is not None and not parent.trace_flags.sampled:
        # The sampler would drop the span: none is made; the handler runs in the context the message brought
        # (its publishes carry it on, its log records get its ids).
        span, running = None, in_context(parent)
    else:
        links = link_to_first(headers)
        if route.recording:  # as in publish
            attributes = _processed(delivery, route, dict(route.attributes))
            span = state.start_child(route.name, parent, route.kind, attributes, links)
            route.recording = span.is_recording()
        else:
            span = state.start_child(route.name, parent, route.kind, route.attributes, links)
            if span.is_recording():
                route.recording = True
                span.set_attributes(_processed(delivery, route, {}))
        # the handler's context: this span current, nothing else (as the propagator's context, with the span set)
        running = trace.set_span_in_context(span, EMPTY)
    token = otel_context.attach(running)
    quiet = QUIET.set(False) if QUIET.get() else None
    route.consumed[0] += 1
    route.in_flight[0] += 1
    started = time.perf_counter()
    try:
        await consumer.callback(delivery)
    except BaseException as exc:
        if span is not None:
            _fail(span, exc)
        raise
    finally:
        state.process_duration.record(time.perf_counter() - started, route.duration_attributes, running)
        route.in_flight[0] -= 1
        settled = delivery.settled
        if settled is None:  # handed over (an iterated subscription): counted when the reader settles it
            delivery._settler.counted = partial(_count_settled, state, route)
        else:
            _count_settled(state, route, settled)
        if quiet is not None:
            QUIET.reset(quiet)
        otel_context.detach(token)
        if span is not None:
            span.end()


def _count_settled(state: Instruments, route: ProcessRoute, settled: Settlement) -> None:
    if settled is Settlement.ACKED:
        route.acked[0] += 1
    elif settled is not Settlement.AUTO:
        state.nacked.add(1, (("amqpkit.settlement", settled.value), *route.key))


async def rpc_call(
    client: RpcClient,
    method: str | None,
    payload: Any,
    returns: Any,
    timeout: float | None,
    headers: Mapping[str, Any] | None,
) -> Any:
    state = current
    carrier: dict[str, Any] = dict(headers) if headers else {}
    if state is None:
        token = QUIET.set(True)
        try:
            return await client._call(method, payload, returns, timeout, carrier)
        finally:
            QUIET.reset(token)
    key = (client.exchange, client.routing_key, method, client.reply_queue)
    route = state.call_routes.get(key) or state.call_route(key)
    span: Span | None = None
    parent = trace.get_current_span().get_span_context() if state.drops_unsampled else None
    if parent is not None and parent.is_valid and not parent.trace_flags.sampled:
        inject(parent, carrier)  # the sampler would drop the span: none is made, the context goes on as it is
    else:
        span = state.tracer.start_span(route.name, kind=SpanKind.CLIENT, attributes=route.attributes)
        inject(span.get_span_context(), carrier)
    token = QUIET.set(True)
    started = time.perf_counter()
    outcome = "ok"
    try:
        return await client._call(method, payload, returns, timeout, carrier)
    except BaseException as exc:
        outcome = type(exc).__name__
        if span is not None:
            _fail(span, exc)
        raise
    finally:
        QUIET.reset(token)
        # recorded in the CLIENT span (never made current: the reply ends it elsewhere), so that an exemplar names it
        caller = otel_context.get_current()
        state.rpc_duration.record(time.perf_counter() - started, route.outcome(outcome),
                                  caller if span is None else trace.set_span_in_context(span, caller))  # fmt: skip
        if span is not None:
            span.end()


def handler_failed(exc: BaseException) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        _fail(span, exc)


def retry(headers: dict[str, Any], exc: BaseException) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        _fail(span, exc)
        span.set_attribute("amqpkit.task.attempt", as_int(headers.get("x-attempt")) - 1)
        span.add_event("amqpkit.task.retry", {"amqpkit.task.next_attempt": as_int(headers.get("x-attempt"))})
        first = traceparent(span)
        if first is not None:
            headers.setdefault(FIRST_ATTEMPT_HEADER, first)


def retried() -> None:
    state = current
    if state is not None:
        state.retried.add(1, {"messaging.system": "rabbitmq"})


def dead_letter(headers: dict[str, Any], reason: str, exc: BaseException) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        _fail(span, exc)
        span.set_attribute("amqpkit.task.attempt", as_int(headers.get("x-attempts")))
        span.add_event("amqpkit.task.dead_letter", {"amqpkit.task.dead_letter_reason": reason})
        first = traceparent(span)
        if first is not None:
            headers.setdefault(FIRST_ATTEMPT_HEADER, first)


def dead_lettered(reason: str) -> None:
    state = current
    if state is not None:
        state.dead_lettered.add(1, {"messaging.system": "rabbitmq", "amqpkit.task.dead_letter_reason": reason})


def outbox_add(headers: dict[str, Any]) -> None:
    """An outbox row is being stored: it keeps the current span's context for the relay (see ``relayed``)."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        headers.pop("tracestate", None)  # a forwarded envelope's old state; the current span's own is written
        inject(span_context, headers)


@contextlib.contextmanager
def relayed(headers: Mapping[str, Any]) -> Iterator[None]:
    """The relay publishes a row: the context the row carries is current, so the PRODUCER span is its child."""
    parent = extract(headers)
    if parent is EMPTY:  # a row written with no span current (or before instrumenting): as any publish
        yield
        return
    token = otel_context.attach(parent)
    try:
        yield
    finally:
        otel_context.detach(token)


# When each Broker's outage began, until it reconnects or is closed (closed during an outage, it was kept for
# ever, and a later Broker given its id would have counted that outage's time as its own); weakly, as a net.
_disconnected_at: weakref.WeakKeyDictionary[Broker, float] = weakref.WeakKeyDictionary()


def disconnected(broker: Broker) -> None:
    _disconnected_at.setdefault(broker, time.monotonic())


def closed(broker: Broker) -> None:
    _disconnected_at.pop(broker, None)


def reconnected(broker: Broker, seconds: float) -> None:
    state = current
    since = _disconnected_at.pop(broker, None)
    if state is None:
        return
    away = time.monotonic() - since if since is not None else seconds
    state.reconnects.add(1, {"messaging.system": "rabbitmq"})
    state.disconnected_time.add(away, {"messaging.system": "rabbitmq"})
