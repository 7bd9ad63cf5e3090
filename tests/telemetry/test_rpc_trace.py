"""RPC in one trace: the call a CLIENT span, the handler a SERVER span under it, by either reply route."""

from __future__ import annotations

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from amqpkit import Broker, Queue, RemoteError, RpcClient, RpcServer

from .conftest import Telemetry


@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
async def test_rpc_call_and_handler_are_one_trace(broker: Broker, name: str, otel: Telemetry, reply_queue: str) -> None:
    server = RpcServer(broker, Queue(name, auto_delete=True))

    @server.method("add")
    async def add(numbers: list[int]) -> int:
        return sum(numbers)

    @server.method("fail")
    async def fail(numbers: list[int]) -> int:
        raise ValueError("no")

    async with server, RpcClient(broker, name, reply_queue=reply_queue, timeout=30) as client:  # type: ignore[arg-type]
        assert await client.call("add", [1, 2], returns=int) == 3
        with pytest.raises(RemoteError):
            await client.call("fail", [1])

    clients = {s.name: s for s in otel.spans() if s.kind is SpanKind.CLIENT}
    servers = {s.name: s for s in otel.spans() if s.kind is SpanKind.SERVER}
    assert set(clients) == set(servers) == {f"{name}/add", f"{name}/fail"}
    for method in ("add", "fail"):
        call, serve = clients[f"{name}/{method}"], servers[f"{name}/{method}"]
        assert serve.parent is not None and serve.parent.span_id == call.context.span_id
        assert serve.context.trace_id == call.context.trace_id
        assert call.end_time is not None and serve.end_time is not None and call.end_time >= serve.end_time
        for span in (call, serve):
            attrs = span.attributes or {}
            assert attrs["messaging.system"] == "rabbitmq"
            assert attrs["messaging.rabbitmq.destination.routing_key"] == name
            assert attrs["rpc.method"] == method
        assert serve.attributes["messaging.operation.type"] == "process"
        assert serve.attributes["messaging.message.conversation_id"]  # the correlation id
    # No PRODUCER span of its own for the request (the CLIENT span is the send), nor CONSUMER span for the reply.
    assert not [s for s in otel.spans() if s.kind in (SpanKind.PRODUCER, SpanKind.CONSUMER)]

    failed_call, failed_serve = clients[f"{name}/fail"], servers[f"{name}/fail"]
    assert failed_serve.attributes["error.type"] == "ValueError"
    assert failed_serve.status.status_code is StatusCode.ERROR
    assert failed_call.attributes["error.type"] == "RemoteError"
    assert "error.type" not in (clients[f"{name}/add"].attributes or {})

    outcomes = {attrs["amqpkit.rpc.outcome"]: count for attrs, count in otel.metric("amqpkit.rpc.client.duration")}
    assert outcomes == {"ok": 1, "RemoteError": 1}
