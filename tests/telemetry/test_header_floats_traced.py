"""Instrumented, a float in a header still goes as a 64-bit double: the publish hook writes the trace context into
the headers the core built (floats already doubles), not into a copy of the envelope's."""

from __future__ import annotations

from amqpkit import Broker, Envelope, Queue

from ..test_header_floats import FLOATS, _same, until_got
from .conftest import Telemetry


async def test_floats_in_headers_arrive_as_sent_when_traced(broker: Broker, name: str, otel: Telemetry) -> None:
    await broker.declare(Queue(name))
    try:
        await broker.publish(Envelope(b"1", headers=dict(FLOATS)), routing_key=name)
        got = await until_got(broker, name)
        assert _same(FLOATS, {k: v for k, v in got.headers.items() if k in FLOATS}), got.headers
        assert "traceparent" in got.headers  # traced: the hook's path, not the core's alone
        assert [s.kind.name for s in otel.spans()] == ["PRODUCER"]
    finally:
        await broker.delete_queue(name)
