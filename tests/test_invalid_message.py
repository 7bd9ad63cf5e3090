"""A message AMQP cannot carry as it is gets a clear, typed error before anything is sent, on every publish path,
and the connection goes on as before. Header values are not repeated in the error (they may be secrets)."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Awaitable
from typing import Any

import aiormq
import pytest
from pamqp import encode
from pamqp.commands import Basic

from amqpkit import (
    Broker,
    ConnectionLost,
    Envelope,
    InvalidMessage,
    PublishError,
    PublishTimeout,
    Queue,
    RpcClient,
    RpcServer,
)
from amqpkit.publishing import _refused_frames

from .retrying import failed_once_then_done, retried_queue

LONG_KEY = "k" * 129  # AMQP's field names are at most 128 bytes; pamqp cut longer ones short, with only a log line

BAD: dict[str, tuple[dict[str, Any], str]] = {
    "expiration nan": ({"expiration": math.nan}, "expiration"),
    "expiration inf": ({"expiration": math.inf}, "expiration"),
    "priority 300": ({"priority": 300}, "priority"),
    "priority -1": ({"priority": -1}, "priority"),
    "message id 256 bytes": ({"message_id": "m" * 256}, "message_id"),
    "content type 256 bytes": ({"content_type": "c" * 256}, "content_type"),
    "app id 86 three-byte characters": ({"app_id": "€" * 86}, "app_id"),
    "header value of no AMQP type": ({"headers": {"token": object()}}, "'token'"),
    "header value a set": ({"headers": {"token": {"s3cret"}}}, "'token'"),
    "header integer over 64 bits": ({"headers": {"token": 2**70}}, "'token'"),
    "header key 129 characters": ({"headers": {LONG_KEY: 1}}, "128"),
    "nested header key 129 characters": ({"headers": {"outer": {LONG_KEY: 1}}}, "128"),
    "header key in a table in a list": ({"headers": {"outer": [{LONG_KEY: 1}]}}, "128"),
    "message id with a lone surrogate": ({"message_id": "a\ud800"}, "message_id"),
    "header name with a lone surrogate": ({"headers": {"a\ud800": 1}}, "surrogate"),
    "header value with a lone surrogate": ({"headers": {"token": "s3cret\ud800"}}, "'token'"),
    # RabbitMQ closes the connection over these (541 INTERNAL_ERROR), and a confirmed publish was sent again
    # after each reconnect: 1,284 reconnects in the 30 s before its PublishTimeout
    "header NaN": ({"headers": {"score": math.nan}}, "'score'"),
    "header infinity in a list in a table": ({"headers": {"m": {"limits": [1.0, -math.inf]}}}, "'limits'"),
}


async def _drain(broker: Broker, queue: str) -> list[bytes]:
    """Every body in ``queue`` now (after a confirmed marker publish, so that unconfirmed ones are in too)."""
    await broker.publish(Envelope(b"marker"), routing_key=queue)
    bodies = []
    while (delivery := await broker.get(queue, auto_ack=True)) is not None:
        bodies.append(delivery.body)
    return bodies


@pytest.mark.parametrize("confirm", [True, False], ids=["confirmed", "unconfirmed"])
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
async def test_a_message_amqp_cannot_carry_is_refused_with_a_typed_error(
    broker: Broker, name: str, case: str, confirm: bool
) -> None:
    fields, named = BAD[case]
    queue = Queue(f"{name}.q", auto_delete=True)
    await broker.declare_queue(queue)
    reconnects = broker.reconnects
    with pytest.raises(InvalidMessage) as refused:
        await broker.publish(Envelope(b"bad", **fields), routing_key=queue.name, confirm=confirm)
    assert isinstance(refused.value, ValueError)  # what an encoder's refusal was before, in most cases
    assert named in str(refused.value)
    assert "s3cret" not in str(refused.value) and "object at" not in str(refused.value)
    # nothing of it reached the queue, and the same connection and channels go on
    await broker.publish(Envelope(b"good"), routing_key=queue.name, confirm=confirm)
    assert sorted(await _drain(broker, queue.name)) == [b"good", b"marker"]  # (two channels: either order)
    assert broker.reconnects == reconnects
    await broker.delete_queue(queue.name)


async def test_a_routing_key_amqp_cannot_carry_is_refused(broker: Broker) -> None:
    for routing_key, named in (("r" * 256, "256 bytes"), ("a\ud800", "surrogate")):
        for confirm in (True, False):
            with pytest.raises(InvalidMessage, match=named):
                await broker.publish(Envelope(b"x"), routing_key=routing_key, confirm=confirm)


async def test_the_longest_names_and_values_amqp_carries_arrive_intact(broker: Broker, name: str) -> None:
    queue = Queue(f"{name}.q", auto_delete=True)
    await broker.declare_queue(queue)
    key = "k" * 128
    headers = {key: 1, "outer": {key: "v"}, "listed": [{key: 2}]}
    await broker.publish(Envelope(b"x", message_id="m" * 255, priority=255, headers=headers, expiration=60),
                         routing_key=queue.name)  # fmt: skip
    delivery = None
    for _ in range(100):
        if (delivery := await broker.get(queue.name, auto_ack=True)) is not None:
            break
        await asyncio.sleep(0.05)
    assert delivery is not None
    assert delivery.message_id == "m" * 255
    assert delivery.headers[key] == 1 and delivery.headers["outer"] == {key: "v"}
    assert delivery.headers["listed"] == [{key: 2}]
    await broker.delete_queue(queue.name)


@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
async def test_an_rpc_request_amqp_cannot_carry_is_refused(broker: Broker, name: str, reply_queue: str) -> None:
    server = RpcServer(broker, Queue(name, auto_delete=True))

    @server.method("echo")
    async def echo(value: int) -> int:
        return value

    async with server, RpcClient(broker, name, reply_queue=reply_queue, timeout=30) as client:  # type: ignore[arg-type]
        for headers in ({"token": object()}, {LONG_KEY: 1}, {"score": math.nan}):
            with pytest.raises(InvalidMessage):
                await client.call("echo", 1, headers=headers)
        assert await client.call("echo", 2, returns=int) == 2  # and the client goes on


def _field_table_uncut(value: dict[str, Any]) -> bytes:
    """pamqp's field table, without cutting names over 128 bytes: what another client may send (RabbitMQ carries
    names of up to 255)."""
    data = []
    for key, item in sorted(value.items()):
        data.append(encode.short_string(key))
        data.append(encode.encode_table_value(item))
    output = b"".join(data)
    return struct.pack(">I", len(output)) + output


async def test_a_task_from_another_client_with_a_longer_header_name_is_retried(
    broker: Broker, name: str, amqp_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A name amqpkit cannot send again (over 128 bytes) in a delivery it must forward (a retry, the DLQ): the
    copy carries it cut to 128 bytes, with a warning, as pamqp would cut it; the task is not held up by it."""
    long_name = "x-" + "k" * 198
    work = retried_queue(broker, name)
    await work.declare()
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel()
        with monkeypatch.context() as patched:
            patched.setattr(encode, "field_table", _field_table_uncut)
            patched.setitem(encode.METHODS, "table", _field_table_uncut)  # what properties are encoded with
            properties = Basic.Properties(headers={long_name: 1}, delivery_mode=2)
            await channel.basic_publish(b"1", routing_key=name, properties=properties)
    finally:
        await connection.close()
    seen = await failed_once_then_done(broker, work)
    assert long_name in seen[0].headers  # as it came
    assert long_name[:128] in seen[1].headers and long_name not in seen[1].headers  # the retry's copy
    assert any("128 bytes" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


async def test_a_publish_the_broker_closes_the_connection_over_is_not_sent_for_ever(broker: Broker, name: str) -> None:
    """A message RabbitMQ cannot read makes it close the whole connection (541 INTERNAL_ERROR for a NaN header,
    which amqpkit now refuses before sending; this writes one below that check, as a message amqpkit does not
    yet know to refuse would go). A confirmed publish is sent again after a lost connection; sent again after
    each of these, it closed every new connection until its deadline (257 reconnects in 4 s). Now the third
    such close ends it with a PublishError that says why."""
    queue = Queue(f"{name}.q", auto_delete=True)
    await broker.declare_queue(queue)
    reconnects = broker.reconnects
    properties = Basic.Properties(headers={"score": math.nan})  # pamqp's own float: no check on the way
    with pytest.raises(PublishError, match="closed the connection") as refused:
        await broker._publish(b"bad", properties, "", queue.name, False, True, 20)
    assert not isinstance(refused.value, PublishTimeout)
    assert broker.reconnects - reconnects <= 3
    await broker.publish(Envelope(b"good"), routing_key=queue.name)  # and the Broker goes on
    assert await _drain(broker, queue.name) == [b"good", b"marker"]
    await broker.delete_queue(queue.name)


async def test_publishes_beside_one_the_broker_cannot_read_are_confirmed(broker: Broker, name: str) -> None:
    """200 good confirmed publishes started beside the one the broker closes the connection over: each is in
    flight at a close, and sent again. Sent again together, they were closed with it each time (9 of 200 ended
    with its PublishError); sent again one at a time, every good one is confirmed, and only the bad one fails."""
    queue = Queue(f"{name}.q", auto_delete=True)
    await broker.declare_queue(queue)
    reconnects = broker.reconnects

    async def good(i: int) -> None:
        await asyncio.sleep(0.001 * i)
        await broker.publish(Envelope(str(i).encode()), routing_key=queue.name, timeout=20)

    bad = broker._publish(b"bad", Basic.Properties(headers={"score": math.nan}), "", queue.name, False, True, 20)
    outcomes = await asyncio.gather(bad, *(good(i) for i in range(200)), return_exceptions=True)
    assert isinstance(outcomes[0], PublishError) and not isinstance(outcomes[0], PublishTimeout)
    assert [o for o in outcomes[1:] if o is not None] == []
    assert broker.reconnects - reconnects <= 3
    bodies = set(await _drain(broker, queue.name))
    assert {str(i).encode() for i in range(200)} <= bodies  # (sent again: some may be there twice)
    await broker.delete_queue(queue.name)


async def test_a_publish_sent_again_alone_is_not_failed_by_new_publishes_sent_beside_it(
    broker: Broker, name: str
) -> None:
    """A publish in flight at a close over a frame is sent again alone among such publishes, but new publishes
    went beside it: each new one the broker could not read closed the connection under it too, and the third
    such close failed a good publish with the bad ones' PublishError (the 4.0 run of
    test_permissions' cut-reply test lost 6 allowed publishes so, under CI's load). Now nothing new is sent while
    such a publish is in flight, so a close counts only against the publish that was alone on the wire."""
    queue = Queue(f"{name}.q", auto_delete=True)
    await broker.declare_queue(queue)

    def bad() -> Awaitable[None]:
        return broker._publish(b"bad", Basic.Properties(headers={"score": math.nan}), "", queue.name, False, True, 30)

    async def bad_later(i: int) -> None:
        await asyncio.sleep(0.03 * i)  # new publishes, each meeting suspects being sent again
        await bad()

    goods = [broker.publish(Envelope(str(i).encode()), routing_key=queue.name, timeout=30) for i in range(5)]
    outcomes = await asyncio.gather(*goods, bad(), *(bad_later(i) for i in range(1, 31)), return_exceptions=True)
    failed_good = [o for o in outcomes[:5] if o is not None]
    assert failed_good == [], f"{len(failed_good)} of 5 good publishes failed, e.g. {failed_good[:1]}"
    for outcome in outcomes[5:]:
        assert isinstance(outcome, PublishError) and not isinstance(outcome, PublishTimeout), outcome
    bodies = set(await _drain(broker, queue.name))
    assert {str(i).encode() for i in range(5)} <= bodies
    await broker.delete_queue(queue.name)


def test_only_a_close_the_error_was_caused_by_counts() -> None:
    """A ConnectionLost caused by the broker's close over a frame counts; one that merely happened while an
    earlier such close was being handled (its context, not its cause: an operator's close, say) does not."""
    internal = aiormq.exceptions.ConnectionInternalError("INTERNAL_ERROR")
    caused = ConnectionLost("connection lost")
    caused.__cause__ = internal
    assert _refused_frames(caused) == "INTERNAL_ERROR"
    forced = ConnectionLost("connection lost")
    forced.__cause__ = aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED")
    forced.__context__ = internal
    assert _refused_frames(forced) is None


@pytest.mark.parametrize("body", [b"bytes", "text", None, {"a": 1}], ids=["bytes", "str", "none", "dict"])
async def test_publishing_something_that_is_not_an_envelope_is_a_type_error(broker: Broker, body: Any) -> None:
    # Before: AttributeError "'bytes' object has no attribute 'body'", from deep inside.
    with pytest.raises(TypeError, match=r"Envelope\(body=") as refused:
        await broker.publish(body, routing_key="amqpkit.nowhere")
    assert type(body).__name__ in str(refused.value)
    await broker.publish(Envelope(b"after"), routing_key="amqpkit.nowhere")  # the Broker goes on


@pytest.mark.parametrize("confirm", [True, False], ids=["confirmed", "unconfirmed"])
@pytest.mark.parametrize(
    ("envelope", "where", "match"),
    [
        # Before: TypeError "sequence item 1: expected a bytes-like object, str found", from aiormq's frames.
        (Envelope("text"), {}, r"body must be bytes.*not str.*encode"),  # type: ignore[arg-type]
        (Envelope(None), {}, r"body must be bytes.*not NoneType"),  # type: ignore[arg-type]
        # Before: TypeError "object of type 'NoneType' has no len()".
        (Envelope(b"x"), {"routing_key": None}, r"routing key must be text, not NoneType"),
        (Envelope(b"x"), {"routing_key": b"k"}, r"routing key must be text, not bytes"),
        # Before: AttributeError "'NoneType' object has no attribute 'name'".
        (Envelope(b"x"), {"exchange": None}, r"exchange must be .*Exchange.*not NoneType"),
    ],
    ids=["str-body", "none-body", "none-key", "bytes-key", "none-exchange"],
)
async def test_a_body_key_or_exchange_of_the_wrong_type_is_a_type_error(
    broker: Broker, envelope: Envelope, where: dict[str, Any], match: str, confirm: bool
) -> None:
    arguments = {"routing_key": "amqpkit.nowhere", **where}
    with pytest.raises(TypeError, match=match):
        await broker.publish(envelope, confirm=confirm, **arguments)
    await broker.publish(Envelope(b"after"), routing_key="amqpkit.nowhere")  # the Broker goes on
