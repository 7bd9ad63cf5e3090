"""The same type round-trips by default: each pattern's default sender to a handler annotated with that type.

No codec is passed anywhere here: the sender writes its default (bytes as
they are, everything else as JSON), the receiver decodes by the message's
content type and validates against the handler's annotation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import BaseModel

from amqpkit import (
    Binding,
    Broker,
    Envelope,
    Exchange,
    Publisher,
    Queue,
    RpcClient,
    RpcServer,
    Subscriber,
    Worker,
    WorkQueue,
)

from .waiting import until_ready, wait_for


class Order(BaseModel):
    id: int
    item: str


# (id, annotation as a user writes it, a value of that type)
MATRIX: list[tuple[str, Any, Any]] = [
    ("str", str, "héllo, wörld"),
    ("bytes", bytes, b"\x00\xff raw \x80"),  # not UTF-8: JSON cannot carry it by accident
    ("dict", dict, {"a": [1, 2.5, None, True], "b": "ü"}),
    ("list", list, [1, "two", None, {"three": 3}]),
    ("int", int, 42),
    ("float", float, 2.5),
    ("model", Order, Order(id=7, item="lamp")),
    ("None", None, None),
]


def annotated(annotation: Any, got: list[Any]) -> Callable[[Any], Awaitable[Any]]:
    """``async def handler(value: <annotation>) -> <annotation>``, recording what it was given."""

    async def handler(value):  # type: ignore[no-untyped-def]
        got.append(value)
        return value

    handler.__annotations__ = {"value": annotation, "return": annotation}
    return handler


def same(got: Any, sent: Any) -> None:
    assert got == sent
    assert type(got) is type(sent), f"{type(got).__name__} received for {type(sent).__name__}"


@pytest.mark.parametrize(("annotation", "value"), [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
async def test_publisher_to_subscriber(broker: Broker, name: str, annotation: Any, value: Any) -> None:
    ex = Exchange(f"{name}.events", type="fanout", durable=False, auto_delete=True)
    got: list[Any] = []
    async with Subscriber(broker, ex, annotated(annotation, got)) as sub:
        await Publisher(broker, ex).publish(value)
        await wait_for(lambda: got or sub.rejected)
    assert sub.rejected == 0, "the subscriber could not decode what the default publisher sent"
    (received,) = got
    same(received, value)


@pytest.mark.parametrize(("annotation", "value"), [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
async def test_enqueue_to_worker(broker: Broker, name: str, annotation: Any, value: Any) -> None:
    work: WorkQueue[Any] = WorkQueue(broker, f"{name}.tasks")
    got: list[Any] = []
    try:
        async with Worker(work, annotated(annotation, got)) as worker:
            await work.enqueue(value)
            await wait_for(lambda: got or worker.dead_lettered)
        assert worker.dead_lettered == 0, "the worker could not decode what enqueue sent"
        (received,) = got
        same(received, value)
    finally:
        for queue in (work.name, work.dlq_name):
            await broker.delete_queue(queue)


@pytest.mark.parametrize(("annotation", "value"), [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
async def test_call_to_rpc_server(broker: Broker, name: str, annotation: Any, value: Any) -> None:
    server = RpcServer(broker, Queue(f"{name}.rpc", auto_delete=True))
    got: list[Any] = []
    server.add("echo", annotated(annotation, got))
    async with server, RpcClient(broker, f"{name}.rpc", timeout=10) as client:
        reply = await client.call("echo", value, returns=annotation)
    assert server.rejected == 0
    (received,) = got
    same(received, value)
    same(reply, value)


async def test_a_body_that_does_not_fit_goes_to_the_dlq_intact(broker: Broker, name: str) -> None:
    """A JSON object for a handler annotated ``int``: a typed DecodeError, and the task kept in the DLQ."""
    work: WorkQueue[Any] = WorkQueue(broker, f"{name}.tasks")
    got: list[Any] = []
    try:
        async with Worker(work, annotated(int, got)) as worker:
            task = await work.enqueue({"n": 1})
            await wait_for(lambda: worker.dead_lettered == 1)
        assert got == []
        await until_ready(broker, work.dlq_name, 1)
        letter = await broker.get(work.dlq_name, auto_ack=True)
        assert letter is not None
        assert letter.message_id == task
        assert letter.body == b'{"n":1}'
        assert letter.content_type == "application/json"
        assert letter.headers["x-dead-letter-reason"] == "decode-error"
        assert letter.headers["x-error-type"] == "DecodeError"
        assert "int" in letter.headers["x-error-message"]
    finally:
        for queue in (work.name, work.dlq_name):
            await broker.delete_queue(queue)


async def test_an_unknown_content_type_is_rejected_not_guessed(broker: Broker, name: str) -> None:
    """A handler annotated ``str`` refuses a body labelled as something it cannot read; the DLX keeps it."""
    ex = Exchange(f"{name}.events", type="fanout", durable=False, auto_delete=True)
    dlx = Exchange(f"{name}.dlx", type="fanout", durable=False, auto_delete=True)
    dlq = Queue(f"{name}.dlq")
    await broker.declare(dlx, dlq, Binding(dlx, dlq))
    got: list[Any] = []
    try:
        sub = Subscriber(broker, ex, annotated(str, got), dead_letter_exchange=dlx.name)
        async with sub:
            await broker.publish(Envelope(b"<a/>", content_type="application/xml", message_id="xml"), exchange=ex.name)
            await Publisher(broker, ex).publish("fine")
            await wait_for(lambda: got and sub.rejected)
        assert got == ["fine"]
        await until_ready(broker, dlq.name, 1)
        letter = await broker.get(dlq.name, auto_ack=True)
        assert letter is not None and letter.message_id == "xml" and letter.body == b"<a/>"
    finally:
        await broker.delete_queue(dlq)
        await broker.delete_exchange(dlx)
