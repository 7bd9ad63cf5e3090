"""RpcServer and RpcClient against the real broker."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import textwrap
import time

import pytest
from pydantic import BaseModel

from amqpkit import (
    Broker,
    BrokerSettings,
    ConnectionLost,
    Envelope,
    NoResponder,
    Queue,
    RemoteError,
    RpcClient,
    RpcError,
    RpcServer,
    RpcTimeout,
)
from amqpkit.patterns.rpc import ERROR_CONTENT_TYPE

from .. import processes
from ..brokerctl import close_connections
from ..waiting import wait_for


class Point(BaseModel):
    x: int
    y: int


class Norm(BaseModel):
    value: int
    squared: bool = True


@pytest.fixture(params=["direct", "exclusive"])
def reply_queue(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def make_server(broker: Broker, queue: str, **kw: object) -> RpcServer:
    server = RpcServer(broker, Queue(queue, auto_delete=True), **kw)  # type: ignore[arg-type]

    @server.method("add")
    async def add(pair: list[int]) -> int:
        return pair[0] + pair[1]

    @server.method("norm")
    async def norm(p: Point) -> Norm:
        return Norm(value=p.x * p.x + p.y * p.y)

    @server.method("fail")
    async def fail(_: dict[str, str]) -> None:
        raise ValueError("bad")

    @server.method("slow")
    async def slow(seconds: float) -> str:
        server.slow_started = getattr(server, "slow_started", 0) + 1  # type: ignore[attr-defined]
        await asyncio.sleep(seconds)
        return "done"

    await server.start()
    return server


async def test_typed_calls(broker: Broker, name: str, reply_queue: str) -> None:
    server = await make_server(broker, name)
    async with RpcClient(broker, name, reply_queue=reply_queue) as client:  # type: ignore[arg-type]
        assert await client.call("add", [2, 3]) == 5
        result = await client.call("norm", Point(x=3, y=4), returns=Norm)
        assert result == Norm(value=25)
        assert client.pending == 0
    await server.stop()


async def test_ten_thousand_calls_with_a_thousand_in_flight(broker: Broker, name: str) -> None:
    server = await make_server(broker, name, concurrency=256)
    async with RpcClient(broker, name, timeout=60) as client:
        sem = asyncio.Semaphore(1000)
        in_flight = 0
        peak = 0

        async def one(i: int) -> None:
            nonlocal in_flight, peak
            async with sem:
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    assert await client.call("add", [i, 1]) == i + 1
                finally:
                    in_flight -= 1

        await asyncio.gather(*(one(i) for i in range(10_000)))
        assert peak == 1000
        assert client.pending == 0
        assert client.dropped_replies == 0
    await server.stop()
    assert server.served == 10_000


async def test_remote_error_arrives_well_inside_the_timeout(broker: Broker, name: str, reply_queue: str) -> None:
    server = await make_server(broker, name)
    async with RpcClient(broker, name, timeout=60, reply_queue=reply_queue) as client:  # type: ignore[arg-type]
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:
            await client.call("fail", {})
        assert time.monotonic() - started < 20  # the error reply, not the 60 s timeout
        assert info.value.remote_type == "ValueError"
        assert info.value.remote_message == "bad"
        assert isinstance(info.value, RpcError)
    await server.stop()


async def test_unknown_method_and_undecodable_request_get_error_replies(
    broker: Broker, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server(broker, name)
    caplog.set_level(logging.ERROR, logger="amqpkit")
    async with RpcClient(broker, name, timeout=5) as client:
        with pytest.raises(RemoteError) as info:
            await client.call("nope", 1)
        assert info.value.remote_type == "UnknownMethod"
        with pytest.raises(RemoteError) as info:
            await client.call("norm", {"x": "not a number"})
        assert info.value.remote_type == "DecodeError"
        assert await client.call("add", [1, 1]) == 2  # still serving
    assert server.rejected == 2
    await server.stop()


async def test_no_responder_is_immediate(broker: Broker, name: str, reply_queue: str) -> None:
    async with RpcClient(broker, f"{name}.nobody", timeout=60, reply_queue=reply_queue) as client:  # type: ignore[arg-type]
        started = time.monotonic()
        with pytest.raises(NoResponder):
            await client.call("x", 1)
        assert time.monotonic() - started < 20  # the broker's return, not the 60 s timeout
        assert client.pending == 0


async def test_timeout_and_the_server_skips_the_expired_request(broker: Broker, name: str) -> None:
    server = await make_server(broker, name, concurrency=1)
    async with RpcClient(broker, name) as client:
        # The first call holds the only slot; the second waits in the queue past its deadline.
        first = asyncio.ensure_future(client.call("slow", 5.0, timeout=30))
        await wait_for(lambda: getattr(server, "slow_started", 0) == 1)
        started = time.monotonic()
        with pytest.raises(RpcTimeout) as info:
            await client.call("slow", 0.0, timeout=1.0)
        assert time.monotonic() - started >= 1.0 - 0.01  # not before its deadline
        assert not first.done()  # ended by its own deadline, while it waited behind the first call
        assert isinstance(info.value, TimeoutError)
        assert await first == "done"
        # A call queued after the expired one is answered only once the expired one is out of the way.
        assert await client.call("add", [1, 1], timeout=30) == 2
        assert server.slow_started == 1  # type: ignore[attr-defined]
        assert client.pending == 0
    await server.stop()


async def test_timestamp_and_expiration_requests_are_judged_by_the_broker(broker: Broker, name: str) -> None:
    """Requests from another client: no budget header; their timestamp is another clock's, so it is not trusted."""
    from datetime import UTC, datetime, timedelta

    server = await make_server(broker, name)
    sent = datetime.now(UTC) - timedelta(seconds=10)
    await broker.publish(
        Envelope(b"[1, 2]", content_type="application/json", type="add", reply_to="amq.rabbitmq.reply-to.x",
                 correlation_id="old", timestamp=sent, expiration=30),
        routing_key=name,
    )  # fmt: skip
    # 30 s from a timestamp 10 s old: still wanted, so it runs.
    await wait_for(lambda: server.served)
    assert (server.served, server.expired) == (1, 0)
    await server.stop()
    server = await make_server(broker, name)
    await broker.publish(
        Envelope(b"[1, 2]", content_type="application/json", type="add", reply_to="amq.rabbitmq.reply-to.x",
                 correlation_id="old", timestamp=sent, expiration=2),
        routing_key=name,
    )  # fmt: skip
    # 2 s from a timestamp 10 s old: the same as a sender whose clock is 10 s behind, so it is served.
    # The broker enforces the 2 s expiration while the request is queued (issue 10: no absolute deadlines).
    await wait_for(lambda: server.served)
    assert (server.served, server.expired) == (1, 0)
    await server.stop()


async def test_requests_without_reply_to_or_correlation_id_are_rejected(
    broker: Broker, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server(broker, name)
    caplog.set_level(logging.ERROR, logger="amqpkit")
    await broker.publish(
        Envelope(b"[1,2]", content_type="application/json", type="add", correlation_id="c1", message_id="no-reply-to"),
        routing_key=name,
    )
    await broker.publish(
        Envelope(b"[1,2]", content_type="application/json", type="add", reply_to="somewhere", message_id="no-cid"),
        routing_key=name,
    )
    async with RpcClient(broker, name) as client:
        assert await client.call("add", [1, 2]) == 3
    await wait_for(lambda: server.rejected == 2)
    text = caplog.text
    assert "no-reply-to" in text and "no reply_to" in text
    assert "no-cid" in text and "no correlation_id" in text
    await server.stop()


@pytest.mark.whole_broker(vhost_only=True)
async def test_connection_loss_fails_pending_calls_at_once(settings: BrokerSettings, amqp_url: str, name: str) -> None:
    async with Broker(settings) as server_broker, Broker(settings) as client_broker:
        server = await make_server(server_broker, name)
        async with RpcClient(client_broker, name, timeout=60) as client:
            calls = [asyncio.ensure_future(client.call("slow", 30.0)) for _ in range(10)]
            await wait_for(lambda: getattr(server, "slow_started", 0) == 10)  # all ten are running
            started = time.monotonic()
            await close_connections(amqp_url, "rpc test")
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert time.monotonic() - started < 15  # at the loss, not at the 30 s replies or the 60 s timeout
            assert all(isinstance(r, ConnectionLost) for r in results), results
            # After the reconnect, calls work again.
            await client_broker.wait_connected(10)
            await server_broker.wait_connected(10)
            assert await client.call("add", [1, 2], timeout=10) == 3
        await server.stop()


SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from amqpkit import Broker, BrokerSettings, Queue, RpcServer

    async def main():
        async with Broker(BrokerSettings(url=sys.argv[1])) as broker:
            server = RpcServer(broker, Queue(sys.argv[2], auto_delete=True), concurrency=200)

            @server.method("slow")
            async def slow(seconds: float) -> str:
                print("started", flush=True)
                await asyncio.sleep(seconds)
                return "done"

            async with server:
                print("ready", flush=True)
                await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@pytest.mark.usefixtures("spawned")
async def test_server_killed_with_calls_pending(broker: Broker, name: str, amqp_url: str) -> None:
    proc = await processes.spawn(
        sys.executable, "-c", SERVER_SCRIPT, amqp_url, name, stdout=asyncio.subprocess.PIPE, env=dict(os.environ)
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 15)).strip() == b"ready"
    deadline = 10
    async with RpcClient(broker, name, timeout=deadline) as client:
        started = time.monotonic()
        calls = [asyncio.ensure_future(client.call("slow", 30.0)) for _ in range(100)]
        for _ in range(100):  # every request is in the server's hands
            assert (await asyncio.wait_for(proc.stdout.readline(), deadline)).strip() == b"started"
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert time.monotonic() - started < deadline + 5  # none hangs past its deadline
        assert all(isinstance(r, RpcTimeout | NoResponder | ConnectionLost) for r in results), results
        assert client.pending == 0


async def test_error_reply_content_type(broker: Broker, name: str) -> None:
    server = await make_server(broker, name)
    async with RpcClient(broker, name) as client:
        with pytest.raises(RemoteError):
            await client.call("fail", {})
    assert ERROR_CONTENT_TYPE.startswith("application/")
    await server.stop()


async def test_several_servers_compete_on_one_queue(settings: BrokerSettings, name: str) -> None:
    brokers = [Broker(settings) for _ in range(3)]
    for b in brokers:
        await b.connect()
    try:
        servers = [await make_server(b, name) for b in brokers]
        async with RpcClient(brokers[0], name) as client:
            await asyncio.gather(*(client.call("add", [i, i]) for i in range(300)))
        assert sum(s.served for s in servers) == 300
        assert all(s.served > 0 for s in servers), [s.served for s in servers]
        for s in servers:
            await s.stop()
    finally:
        for b in brokers:
            await b.close()


async def test_retry_helper_is_opt_in(broker: Broker, name: str) -> None:
    async with RpcClient(broker, f"{name}.none", timeout=1) as client:
        started = time.monotonic()
        with pytest.raises(NoResponder):
            await client.call_with_retry("x", 1, attempts=3)
        assert time.monotonic() - started >= 0.2  # it did wait between attempts


async def test_late_replies_are_dropped_and_counted(broker: Broker, name: str) -> None:
    server = await make_server(broker, name, concurrency=4)
    async with RpcClient(broker, name) as client:
        with pytest.raises(RpcTimeout):
            await client.call("slow", 3.0, timeout=1.0)  # delivered at once, so the server runs it
        await wait_for(lambda: client.dropped_replies == 1)  # its reply, two seconds later
        assert client.pending == 0
        assert await client.call("add", [1, 1]) == 2
    await server.stop()
