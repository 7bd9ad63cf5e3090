"""Publish and consume in one trace: a PRODUCER span, a CONSUMER span under it, the semconv attributes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math

import aiormq
import pytest
from opentelemetry.trace import SpanKind, StatusCode
from pamqp.commands import Basic

from amqpkit import Broker, Delivery, Envelope, Exchange, Publisher, Queue, Subscriber, Unroutable
from amqpkit.logs import JsonFormatter
from amqpkit.telemetry import hooks

from ..waiting import wait_for
from .conftest import Telemetry


async def test_publish_and_consume_are_one_trace(broker: Broker, name: str, otel: Telemetry) -> None:
    exchange = Exchange(f"{name}.events", type="topic")
    seen: list[Delivery[bytes]] = []
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler_log = logging.getLogger("test.telemetry.handler")
    handler_log.addHandler(handler)
    handler_log.setLevel(logging.INFO)

    async def on_event(delivery: Delivery[bytes]) -> None:
        handler_log.info("handling %s", delivery.message_id)
        seen.append(delivery)

    try:
        async with Subscriber(broker, exchange, on_event, binding_keys=["order.*"]):
            publisher: Publisher[bytes] = Publisher(broker, exchange)
            message_id = await publisher.publish(b'{"n": 1}', routing_key="order.placed", correlation_id="conv-1")
            # A private subscription's queue is server-named: the span is named after the exchange.
            await wait_for(lambda: seen and otel.named(f"process {exchange.name}"))
    finally:
        handler_log.removeHandler(handler)
        await broker.delete_exchange(exchange.name)

    producer = otel.named(f"send {exchange.name}")
    assert len(producer) == 1
    send = producer[0]
    process = next(s for s in otel.spans() if s.kind is SpanKind.CONSUMER)
    assert send.kind is SpanKind.PRODUCER
    assert send.parent is None  # nothing was current: the publish starts the trace
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert process.context.trace_id == send.context.trace_id
    for span, operation in ((send, "send"), (process, "process")):
        attrs = span.attributes or {}
        assert attrs["messaging.system"] == "rabbitmq"
        assert attrs["messaging.operation.type"] == operation
        assert attrs["messaging.operation.name"] == operation
        assert attrs["messaging.destination.name"] == exchange.name
        assert attrs["messaging.rabbitmq.destination.routing_key"] == "order.placed"
        assert attrs["messaging.message.id"] == message_id
        assert attrs["messaging.message.conversation_id"] == "conv-1"
        assert attrs["messaging.message.body.size"] == len(b'{"n": 1}')
        assert "error.type" not in attrs
    assert str(process.attributes["messaging.destination.subscription.name"]).startswith("amq.gen-")
    # The headers carried W3C trace context.
    assert seen[0].headers["traceparent"].split("-")[1] == format(send.context.trace_id, "032x")

    # The handler's log line carries the consumer span's ids.
    line = json.loads(stream.getvalue().splitlines()[0])
    assert line["trace_id"] == format(process.context.trace_id, "032x")
    assert line["span_id"] == format(process.context.span_id, "016x")

    attrs = {"messaging.system": "rabbitmq", "messaging.destination.name": exchange.name}
    assert (attrs, 1) in otel.metric("messaging.client.sent.messages")
    assert otel.total("messaging.client.consumed.messages") == 1
    assert otel.total("amqpkit.messages.acked") == 1
    assert otel.total("messaging.process.duration") == 1  # one handler run recorded
    assert otel.total("amqpkit.messages.in_flight") == 0


async def test_message_without_context_starts_a_new_trace(
    broker: Broker, amqp_url: str, name: str, otel: Telemetry, caplog: object
) -> None:
    """A client that sends no trace context, and one that sends a malformed traceparent: each a new trace."""
    from amqpkit import Queue

    queue = Queue(f"{name}.plain", auto_delete=True)
    seen: list[Delivery[bytes]] = []

    async def on_message(delivery: Delivery[bytes]) -> None:
        seen.append(delivery)
        await delivery.ack()

    consumer = await broker.consume(queue, on_message)
    connection = await aiormq.connect(amqp_url)  # a plain client, not instrumented
    try:
        channel = await connection.channel()
        await channel.basic_publish(b"plain", routing_key=queue.name, properties=Basic.Properties(message_id="m1"))
        bad = Basic.Properties(message_id="m2", headers={"traceparent": "00-not-a-trace-01", "tracestate": "x=1"})
        with caplog.at_level(logging.DEBUG, logger="amqpkit.telemetry"):  # type: ignore[attr-defined]
            await channel.basic_publish(b"bad", routing_key=queue.name, properties=bad)
            await wait_for(lambda: len([s for s in otel.spans() if s.kind is SpanKind.CONSUMER]) == 2)
    finally:
        await connection.close()
        await consumer.cancel()

    spans = {s.attributes["messaging.message.id"]: s for s in otel.spans() if s.kind is SpanKind.CONSUMER}
    assert set(spans) == {"m1", "m2"}
    for span in spans.values():
        assert span.parent is None  # a root: the message brought no (usable) context
        assert span.context.is_valid
    assert spans["m1"].context.trace_id != spans["m2"].context.trace_id
    assert "malformed traceparent" in caplog.text  # type: ignore[attr-defined]
    assert [d.body for d in seen] == [b"plain", b"bad"]


async def test_a_publish_refused_before_sending_is_a_failed_span(broker: Broker, name: str, otel: Telemetry) -> None:
    """A message whose properties cannot be sent (a NaN expiration) fails its PRODUCER span; the envelope the
    caller passed, headers included, is left as it was."""
    queue = Queue(f"{name}.q", auto_delete=True)
    await broker.declare_queue(queue)
    envelope = Envelope(b"x", expiration=math.nan, headers={"kept": 1})
    with pytest.raises(ValueError, match="expiration"):
        await broker.publish(envelope, routing_key=queue.name)
    [send] = otel.named(f"send {queue.name}")
    assert send.status.status_code is StatusCode.ERROR
    assert send.attributes["error.type"]
    assert envelope.headers == {"kept": 1}
    await broker.publish(Envelope(b"y", headers=envelope.headers), routing_key=queue.name)
    assert envelope.headers == {"kept": 1}  # the trace headers went into a copy
    await broker.delete_queue(queue.name)


async def test_a_publish_while_instruments_are_gone_is_sent_as_asked(
    broker: Broker, name: str, otel: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook still in place but its instruments gone (uninstrument() under way): the publish goes out
    untraced, with its own confirm and mandatory flags."""
    monkeypatch.setattr(hooks, "current", None)
    queue = Queue(f"{name}.q", auto_delete=True)
    await broker.declare_queue(queue)
    await broker.publish(Envelope(b"x"), routing_key=queue.name, confirm=False)
    with pytest.raises(Unroutable):
        await broker.publish(Envelope(b"x"), routing_key=f"{name}.nowhere", mandatory=True)
    got = None
    for _ in range(100):  # the unconfirmed publish: polled for
        if (got := await broker.get(queue.name, auto_ack=True)) is not None:
            break
        await asyncio.sleep(0.05)
    assert got is not None and got.body == b"x" and "traceparent" not in got.headers
    assert not otel.spans()
    await broker.delete_queue(queue.name)


async def test_an_iterated_subscriptions_settlements_are_counted_when_made(
    broker: Broker, name: str, otel: Telemetry
) -> None:
    """Read by iteration, a delivery is settled after the hand-over: its ack or nack still counts, once."""
    exchange = Exchange(f"{name}.iterated", type="fanout")
    publisher: Publisher[bytes] = Publisher(broker, exchange)
    settled: list[str] = []
    try:
        async with Subscriber(broker, exchange) as subscriber:
            for n in range(7):
                await publisher.publish(b"%d" % n)
            async for delivery in subscriber:
                n = int(delivery.body)
                if n < 3:
                    await delivery.ack()
                elif n < 5:
                    await delivery.nack(requeue=False)
                else:
                    await delivery.reject()
                settled.append(delivery.body.decode())
                with pytest.raises(Exception, match="already settled"):
                    await delivery.ack()  # refused: not a second count
                if len(settled) == 7:
                    break
    finally:
        await broker.delete_exchange(exchange.name)

    assert otel.total("messaging.client.consumed.messages") == 7
    assert otel.total("amqpkit.messages.acked") == 3
    nacked = {attrs["amqpkit.settlement"]: value for attrs, value in otel.metric("amqpkit.messages.nacked")}
    assert nacked == {"nacked": 2, "rejected": 2}


async def test_publishing_something_that_is_not_an_envelope_is_a_type_error_traced_too(
    broker: Broker, otel: Telemetry
) -> None:
    with pytest.raises(TypeError, match=r"Envelope\(body="):
        await broker.publish(b"bytes", routing_key="amqpkit.nowhere")  # type: ignore[arg-type]
    assert not otel.spans()  # refused before any span: nothing was published


async def test_a_publish_of_the_wrong_types_is_a_type_error_instrumented(broker: Broker, otel: Telemetry) -> None:
    """The publish hook read the exchange's name and the body's size before the core's checks: an AttributeError
    for an exchange of None, a TypeError of len() for a body of None. Refused before the hook now, with no span."""
    with pytest.raises(TypeError, match="exchange must be"):
        await broker.publish(Envelope(b"x"), exchange=None, routing_key="amqpkit.nowhere")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="body must be bytes"):
        await broker.publish(Envelope(None), routing_key="amqpkit.nowhere")  # type: ignore[arg-type]
    assert otel.spans() == []
