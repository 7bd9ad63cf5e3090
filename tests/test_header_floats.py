"""A float in a header arrives as it was sent: amqpkit sends AMQP's 64-bit double, where pamqp sends every float as
a 32-bit one (19.99 arrived as 19.989999771118164, and 1e300 was refused as a value AMQP cannot carry)."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from typing import Any

import aiormq
import pytest
from pamqp import encode
from pamqp.commands import Basic

from amqpkit import (
    Binding,
    Broker,
    Delivery,
    Envelope,
    Exchange,
    Queue,
    RpcClient,
    RpcServer,
)

from .retrying import failed_once_then_done, retried_queue
from .waiting import until

FLOATS: dict[str, Any] = {
    "price": 19.99,
    "tenth": 0.1,
    "tiny": 2.5e-8,
    "huge": 1e300,
    "negative zero": -0.0,
    "nested": {"rate": 0.1, "list": [1.1, {"deeper": 3.3}]},
    "list": [0.2, 7, "seven"],
}


def _same(sent: Any, got: Any) -> bool:
    """Equal, and a float where a float was sent (with its sign: -0.0 == 0.0)."""
    if isinstance(sent, dict):
        return isinstance(got, dict) and sent.keys() == got.keys() and all(_same(sent[k], got[k]) for k in sent)
    if isinstance(sent, list):
        return isinstance(got, list) and len(sent) == len(got) and all(map(_same, sent, got))
    if isinstance(sent, float):
        return type(got) is float and got == sent and math.copysign(1, got) == math.copysign(1, sent)
    return bool(sent == got)


@pytest.mark.parametrize("confirm", [True, False], ids=["confirmed", "unconfirmed"])
async def test_floats_in_headers_arrive_as_sent(broker: Broker, name: str, confirm: bool) -> None:
    await broker.declare(Queue(name))
    headers = dict(FLOATS)
    try:
        await broker.publish(Envelope(b"1", headers=headers), routing_key=name, confirm=confirm)
        assert type(headers["price"]) is float and type(headers["nested"]["rate"]) is float  # the caller's, as given
        got = await until_got(broker, name)
        assert _same(FLOATS, got.headers), got.headers
    finally:
        await broker.delete_queue(name)


async def test_floats_in_rpc_request_headers_arrive_as_sent(broker: Broker, name: str) -> None:
    seen: list[dict[str, Any]] = []

    async def echo(delivery: Delivery[int]) -> int:
        seen.append(dict(delivery.headers))
        return delivery.value

    server = RpcServer(broker, Queue(f"{name}.rpc"))
    server.add("echo", echo)
    try:
        async with server, RpcClient(broker, f"{name}.rpc") as client:
            assert await client.call("echo", 3, returns=int, headers=dict(FLOATS)) == 3
        assert _same(FLOATS, {k: v for k, v in seen[0].items() if k in FLOATS})
    finally:
        await broker.delete_queue(f"{name}.rpc")


async def until_got(broker: Broker, queue: str) -> Delivery[bytes]:
    """The next message on ``queue`` (an unconfirmed publish may still be on its way)."""
    found: list[Delivery[bytes]] = []

    async def got() -> bool:
        delivery = await broker.get(queue, auto_ack=True)
        if delivery is not None:
            found.append(delivery)
        return bool(found)

    await until(got)
    return found[0]


async def test_a_double_from_another_client_survives_a_retry(
    broker: Broker, name: str, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header another client sent as a double beyond a 32-bit float's range: the retry's copy carries it.
    Before, the copy could not be encoded and the task went back to its queue once a second, for ever."""
    work = retried_queue(broker, name)
    await work.declare()
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel()
        table = b"\x04huge" + b"d" + struct.pack(">d", 1e300) + b"\x04fineS" + struct.pack(">I", 2) + b"ok"
        with monkeypatch.context() as patched:  # what another client's encoder wrote
            patched.setitem(encode.METHODS, "table", lambda value: struct.pack(">I", len(table)) + table)
            await channel.basic_publish(b"1", routing_key=name, properties=Basic.Properties(headers={"x": 1}))
    finally:
        await connection.close()
    seen = await failed_once_then_done(broker, work)
    assert seen[0].headers["huge"] == 1e300 and seen[1].headers["huge"] == 1e300
    assert seen[1].headers["fine"] == "ok"


class Money(float):
    """A user's own float type (numpy's float64 is one too)."""


async def test_a_float_of_a_users_own_type_arrives_as_sent(broker: Broker, name: str) -> None:
    await broker.declare(Queue(name))
    try:
        await broker.publish(Envelope(b"1", headers={"price": Money(19.99), "big": Money(1e300)}), routing_key=name)
        got = await until_got(broker, name)
        assert got.headers == {"price": 19.99, "big": 1e300}
    finally:
        await broker.delete_queue(name)


async def test_a_headers_binding_on_a_float_matches_the_float_sent(broker: Broker, name: str) -> None:
    """The binding's float goes as a double too: as pamqp's 32-bit float it would not be the number the message
    carries, and the message would not be routed (Unroutable; without mandatory, dropped)."""
    exchange = Exchange(f"{name}.h", type="headers")
    queue = Queue(f"{name}.q")
    await broker.declare(exchange, queue, Binding(exchange, queue, headers={"price": 19.99}))
    try:
        await broker.publish(Envelope(b"1", headers={"price": 19.99}), exchange=exchange, mandatory=True)
        got = await until_got(broker, queue.name)
        assert got.headers["price"] == 19.99
    finally:
        await broker.delete_queue(queue.name)
        await broker.delete_exchange(exchange)


def test_loading_the_module_again_keeps_one_encoder() -> None:
    """importlib.reload(amqpkit.message) must not wrap the wrapper (every table value then recursed for ever) nor
    make a second double type the encoder does not know. In a process of its own: a reload redefines every class
    in the module."""
    script = (
        "import importlib, amqpkit.message as m\n"
        "from pamqp import encode\n"
        "before = m.as_doubles({'v': 19.99})\n"
        "importlib.reload(m)\n"
        "after = m.as_doubles({'v': 19.99})\n"
        "print(encode.field_table(before)[-9:-8], encode.field_table(after)[-9:-8], encode.field_table({'a': 1}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == r"b'd' b'd' b'\x00\x00\x00\x04\x01ab\x01'"
