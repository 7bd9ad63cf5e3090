"""An outbox row keeps its writer's trace: the relay publishes it later, under the span that added it.

``Outbox.add`` stores the current trace context with the row, and the relay,
which runs in a task of its own with no span current, publishes the row with
that context as the parent of its PRODUCER span; the consumer's span follows
in the same trace. On both stores.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from amqpkit import Broker, Delivery, Exchange, Subscriber
from amqpkit.outbox import Outbox, Relay, Store

from ..waiting import wait_for
from .conftest import Telemetry


async def test_relayed_row_stays_in_the_writers_trace(broker: Broker, name: str, otel: Telemetry, store: Store) -> None:
    exchange = Exchange(f"{name}.events", type="topic")
    seen: list[Delivery[bytes]] = []

    async def on_event(delivery: Delivery[bytes]) -> None:
        seen.append(delivery)

    assert otel.tracer_provider is not None
    tracer = otel.tracer_provider.get_tracer("test.outbox")
    outbox = Outbox(store)
    try:
        async with Subscriber(broker, exchange, on_event, binding_keys=["order.*"]):
            with tracer.start_as_current_span("place order") as writer:
                async with store.transaction() as tx:
                    message_id = await outbox.add(tx, {"order": 1}, exchange=exchange, routing_key="order.placed")
            # Started after the writer's span ended and outside it: the relay's task has no span of its own.
            assert not trace.get_current_span().get_span_context().is_valid
            async with Relay(store, broker, poll_interval=0.05):
                await wait_for(lambda: seen and otel.named(f"process {exchange.name}"))
    finally:
        await broker.delete_exchange(exchange.name)

    assert seen[0].message_id == message_id
    write = writer.get_span_context()
    send = next(s for s in otel.spans() if s.kind is SpanKind.PRODUCER)
    process = next(s for s in otel.spans() if s.kind is SpanKind.CONSUMER)
    assert send.context.trace_id == write.trace_id
    assert send.parent is not None and send.parent.span_id == write.span_id
    assert process.context.trace_id == write.trace_id
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    # The message carries the PRODUCER span's context, not the writer's stored one.
    traceparent = seen[0].headers["traceparent"]
    assert isinstance(traceparent, str) and f"{send.context.span_id:016x}" in traceparent


async def test_a_row_added_with_no_span_current_starts_its_own_trace(
    broker: Broker, name: str, otel: Telemetry, store: Store
) -> None:
    exchange = Exchange(f"{name}.events", type="topic")
    seen: list[Delivery[bytes]] = []

    async def on_event(delivery: Delivery[bytes]) -> None:
        seen.append(delivery)

    try:
        async with Subscriber(broker, exchange, on_event, binding_keys=["order.*"]):
            async with store.transaction() as tx:
                await Outbox(store).add(tx, {"order": 2}, exchange=exchange, routing_key="order.placed")
            async with Relay(store, broker, poll_interval=0.05):
                await wait_for(lambda: seen and otel.named(f"process {exchange.name}"))
    finally:
        await broker.delete_exchange(exchange.name)

    send = next(s for s in otel.spans() if s.kind is SpanKind.PRODUCER)
    process = next(s for s in otel.spans() if s.kind is SpanKind.CONSUMER)
    assert send.parent is None
    assert process.context.trace_id == send.context.trace_id


async def test_without_instrumentation_a_row_stores_no_trace_context(store: Store) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from amqpkit import Envelope, _hooks

    assert _hooks.outbox_add is None and _hooks.relayed is None  # nothing instrumented in this test
    envelope = Envelope(b"{}", headers={"k": "v"})
    with TracerProvider().get_tracer("test.outbox").start_as_current_span("a span amqpkit does not see"):
        async with store.transaction() as tx:
            await Outbox(store).add(tx, envelope, exchange="x", routing_key="r")
    async with store.claim(10) as claim:
        assert [row.headers for row in claim.rows] == [{"k": "v"}]


async def test_add_does_not_change_the_callers_envelope(otel: Telemetry, store: Store) -> None:
    from amqpkit import Envelope

    assert otel.tracer_provider is not None
    envelope = Envelope(b"{}", headers={"k": "v"})
    with otel.tracer_provider.get_tracer("test.outbox").start_as_current_span("writer") as writer:
        async with store.transaction() as tx:
            await Outbox(store).add(tx, envelope, exchange="x", routing_key="r", headers={"more": 1})
    assert envelope.headers == {"k": "v"}
    async with store.claim(10) as claim:
        (row,) = claim.rows
    assert row.headers["more"] == 1
    written = writer.get_span_context()
    assert row.headers["traceparent"] == (
        f"00-{written.trace_id:032x}-{written.span_id:016x}-{written.trace_flags:02x}"
    )
