"""The small CLI tools against the real broker: publish, consume, call; --help and --version."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from amqpkit import Broker, Delivery, Envelope, Queue, RpcServer, __version__

from . import processes
from .waiting import wait_for

pytestmark = pytest.mark.usefixtures("spawned")  # every CLI process ends with its test


async def cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await processes.spawn(
        sys.executable, "-m", "amqpkit.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_version_and_help() -> None:
    assert await cli("--version") == (0, f"amqpkit {__version__}\n", "")
    code, out, _ = await cli("--help")
    assert code == 0
    for command in ("bench", "worker", "dlq", "publish", "consume", "call", "check"):
        assert command in out


async def test_check(amqp_url: str) -> None:
    code, out, _ = await cli("check", "--url", amqp_url)
    assert code == 0
    assert out.startswith("ok: RabbitMQ ")
    assert "guest:***@" in out


async def test_publish_then_consume_a_queue(broker: Broker, amqp_url: str, name: str) -> None:
    await broker.declare_queue(Queue(name, type="quorum"))  # consume must not re-declare it as classic
    try:
        code, out, err = await cli("publish", "hello", "-k", name, "--count", "3", "-H", "k=v", "--url", amqp_url)
        assert code == 0, err
        assert "published 3 message(s)" in out
        code, out, err = await cli("publish", "--json", '{"n": 1}', "-k", name, "--url", amqp_url)
        assert code == 0, err
        code, out, err = await cli("consume", "--queue", name, "--count", "4", "--timeout", "10", "--url", amqp_url)
        assert code == 0, err
        lines = out.splitlines()
        assert len(lines) == 4
        assert lines[0].endswith("] hello")
        assert lines[3].endswith('] {"n": 1}')
        assert (await broker.queue_counts(name))[0] == 0
    finally:
        await broker.delete_queue(name)


async def test_consume_an_exchange_with_bindings(broker: Broker, amqp_url: str, name: str) -> None:
    exchange = f"{name}.x"
    proc = await processes.spawn(
        sys.executable, "-m", "amqpkit.cli", "consume", "--exchange", exchange, "-b", "a.*", "--count", "1",
        "--timeout", "20", "--url", amqp_url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        assert b"consuming from" in await asyncio.wait_for(proc.stderr.readline(), 15)
        code, _, err = await cli("publish", "not me", "-e", exchange, "-k", "b.x", "--url", amqp_url)
        assert code == 0, err
        code, _, err = await cli("publish", "me", "-e", exchange, "-k", "a.x", "--url", amqp_url)
        assert code == 0, err
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0
        lines = out.decode().splitlines()
        assert len(lines) == 1  # 'b.x' did not match the binding
        assert lines[0].startswith(f"[{exchange} 'a.x' id=")
        assert lines[0].endswith("] me")
    finally:
        await broker.delete_exchange(exchange)


async def test_call(broker: Broker, amqp_url: str, name: str) -> None:
    server = RpcServer(broker, Queue(name, auto_delete=True))

    @server.method("add")
    async def add(pair: list[int]) -> int:
        return pair[0] + pair[1]

    @server.method("fail")
    async def fail(_: object) -> None:
        raise ValueError("nope")

    async with server:
        assert await cli("call", name, "add", "[2, 40]", "--url", amqp_url) == (0, "42\n", "")
        code, _, err = await cli("call", name, "fail", "--url", amqp_url)
        assert code == 1
        assert err.strip() == "error: RemoteError: ValueError: nope"
    code, _, err = await cli("call", f"{name}.nobody", "x", "--url", amqp_url)
    assert code == 1
    assert "NoResponder" in err


@pytest.mark.parametrize("args", [["publish", "-k", "q"], ["call", "q", "m", "{bad"], ["consume"]])
async def test_bad_arguments_exit_2(args: list[str]) -> None:
    code, _, err = await cli(*args)
    assert code == 2
    assert "Traceback" not in err


async def test_consume_count_takes_no_more_than_it_shows(broker: Broker, amqp_url: str, name: str) -> None:
    """Before, ``--count N`` asked for N at a time and acked each as it showed it, so the broker sent more while it
    got to N; each extra was nacked back: marked redelivered, and on a quorum queue counted towards its delivery
    limit (RabbitMQ 4.x's default 20: a queue read that way 20 times lost what it returned). Now no more than N are
    delivered: the last acks wait until the Nth message is shown."""
    await broker.declare_queue(Queue(name, type="quorum"))
    try:
        for i in range(40):
            await broker.publish(Envelope(str(i).encode()), routing_key=name)
        code, out, err = await cli("consume", "--queue", name, "--count", "5", "--timeout", "10", "--url", amqp_url)
        assert code == 0, err
        assert [line.rsplit("] ", 1)[1] for line in out.splitlines()] == ["0", "1", "2", "3", "4"]
        assert (await broker.queue_counts(name))[0] == 35
        rest: list[Delivery[bytes]] = []

        async def keep(delivery: Delivery[bytes]) -> None:
            rest.append(delivery)
            await delivery.ack()

        consumer = await broker.consume(Queue(name, type="quorum"), keep, prefetch=50)
        await wait_for(lambda: len(rest) == 35)
        await consumer.cancel()
        assert [d.body for d in rest] == [str(i).encode() for i in range(5, 40)]
        assert [d.body for d in rest if d.redelivered] == []
    finally:
        await broker.delete_queue(name)


async def test_consume_count_over_a_prefetch(broker: Broker, amqp_url: str, name: str) -> None:
    """Before, ``--count 70000`` failed with a traceback: the count was the consumer's prefetch, at most 65535."""
    await broker.declare_queue(Queue(name))
    try:
        for i in range(3):
            await broker.publish(Envelope(str(i).encode()), routing_key=name)
        code, out, err = await cli("consume", "--queue", name, "--count", "70000", "--timeout", "3", "--url", amqp_url)
        assert code == 0, err
        assert len(out.splitlines()) == 3
        assert (await broker.queue_counts(name))[0] == 0
    finally:
        await broker.delete_queue(name)


@pytest.mark.parametrize("count", ["0", "-1"])
async def test_consume_count_below_one_is_a_usage_error(broker: Broker, amqp_url: str, name: str, count: str) -> None:
    """Before, ``--count 0`` nacked every message back at once, again and again until the timeout (each counted
    towards a quorum queue's delivery limit)."""
    await broker.declare_queue(Queue(name, type="quorum"))
    try:
        await broker.publish(Envelope(b"kept"), routing_key=name)
        code, out, err = await cli("consume", "--queue", name, "--count", count, "--timeout", "2", "--url", amqp_url)
        assert code == 2, (out, err)
        assert "Traceback" not in err
        got: list[Delivery[bytes]] = []

        async def keep(delivery: Delivery[bytes]) -> None:
            got.append(delivery)
            await delivery.ack()

        consumer = await broker.consume(Queue(name, type="quorum"), keep)
        await wait_for(lambda: len(got) == 1)
        await consumer.cancel()
        assert not got[0].redelivered
    finally:
        await broker.delete_queue(name)
