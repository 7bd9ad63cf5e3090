"""RPC under issue 10: a deadline that does not depend on two clocks agreeing; a server that reports a lost queue."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from amqpkit import Broker, BrokerSettings, ConnectionLost, Envelope, Queue, RpcClient, RpcServer, RpcTimeout

from ..reliability.proxy import FaultProxy
from ..waiting import hold_the_loop, wait_for


def _server(broker: Broker, queue: str, **kw: object) -> RpcServer:
    server = RpcServer(broker, Queue(queue, auto_delete=True), **kw)  # type: ignore[arg-type]
    server.adds = 0  # type: ignore[attr-defined]

    @server.method("add")
    async def add(pair: list[int]) -> int:
        server.adds += 1  # type: ignore[attr-defined]
        return pair[0] + pair[1]

    return server


async def _reply_queue(broker: Broker, name: str, cleanup: list[str]) -> str:
    replies = f"{name}.replies"
    cleanup.append(f"q:{replies}")
    await broker.declare_queue(Queue(replies))
    return replies


async def test_a_skewed_absolute_deadline_does_not_skip_a_request_with_time_left(
    broker: Broker, name: str, cleanup: list[str]
) -> None:
    """The caller's clock is 10 s behind the server's: its absolute headers say "past", its budget says 5 s left."""
    replies = await _reply_queue(broker, name, cleanup)
    behind = time.time() - 10
    async with _server(broker, name) as server:
        await broker.publish(
            Envelope(
                b"[1, 2]", content_type="application/json", type="add", reply_to=replies, correlation_id="skewed",
                timestamp=datetime.fromtimestamp(behind, UTC), expiration=5,
                headers={"x-deadline": int((behind + 5) * 1000), "x-timeout-ms": 5000},
            ),
            routing_key=name,
            mandatory=True,
        )  # fmt: skip
        await wait_for(lambda: server.served == 1, 10)
        assert server.expired == 0
        reply = await broker.get(replies, auto_ack=True)
        assert reply is not None
        assert (reply.correlation_id, json.loads(reply.body)) == ("skewed", 3)


async def test_an_old_client_with_a_skewed_clock_is_served_too(broker: Broker, name: str, cleanup: list[str]) -> None:
    """Only absolute headers (an older client, or timestamp + expiration): the broker enforces the
    expiration while the request is queued; the server does not second-guess it with another clock."""
    replies = await _reply_queue(broker, name, cleanup)
    behind = time.time() - 10
    async with _server(broker, name) as server:
        for cid, headers in (("old-amqpkit", {"x-deadline": int((behind + 5) * 1000)}), ("foreign", {})):
            await broker.publish(
                Envelope(
                    b"[2, 2]", content_type="application/json", type="add", reply_to=replies, correlation_id=cid,
                    timestamp=datetime.fromtimestamp(behind, UTC), expiration=5, headers=headers,
                ),
                routing_key=name,
                mandatory=True,
            )  # fmt: skip
        await wait_for(lambda: server.served == 2, 10)
        assert server.expired == 0


async def test_the_client_sends_a_relative_budget(broker: Broker, name: str, cleanup: list[str]) -> None:
    """What goes on the wire: the time left as the expiration and as x-timeout-ms, no absolute deadline."""
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    async with RpcClient(broker, name, timeout=5) as client:
        call = asyncio.ensure_future(client.call("add", [1, 1]))
        try:
            request = None
            while request is None:
                assert not call.done(), call
                request = await broker.get(name)
            budget = request.headers["x-timeout-ms"]
            assert 0 < budget <= 5000
            assert "x-deadline" not in request.headers
            assert request.envelope.expiration is not None
            assert 0 < request.envelope.expiration <= 5
            assert request.envelope.timestamp is None
            # A hand-written server answers; the call completes.
            assert request.reply_to is not None
            await broker.publish(
                Envelope(b"2", content_type="application/json", correlation_id=request.correlation_id),
                routing_key=request.reply_to,
                confirm=False,
            )
            await request.ack()
            assert await asyncio.wait_for(call, 10) == 2
        finally:
            call.cancel()


async def test_a_request_whose_budget_ran_out_in_the_queue_is_not_run(broker: Broker, name: str) -> None:
    release = asyncio.Event()
    server = _server(broker, name, concurrency=1)

    @server.method("hold")
    async def hold(_: None) -> str:
        await release.wait()
        return "held"

    async with server, RpcClient(broker, name, timeout=30) as client:
        holding = asyncio.ensure_future(client.call("hold"))
        try:
            await wait_for(lambda: server.broker is broker and client.pending == 1 and _running(server), 10)
            # The only slot is taken: this request waits in the queue until its 1 s budget is gone.
            with pytest.raises(RpcTimeout):
                await client.call("add", [1, 1], timeout=1)
            # The caller's clock ran out; the broker counts the expiration from when the request reached the
            # queue, a little later. Let that pass too before the slot frees (a loaded CI machine once did not).
            await asyncio.sleep(0.5)
            release.set()
            assert await asyncio.wait_for(holding, 10) == "held"
            # Requests queued behind the expired one are served; the expired one never ran.
            assert await client.call("add", [2, 2]) == 4
            assert server.adds == 1  # type: ignore[attr-defined]
        finally:
            release.set()
            holding.cancel()


def _running(server: RpcServer) -> bool:
    consumer = server._consumer
    return consumer is not None and len(consumer.inflight) == 1


async def test_a_call_given_up_on_is_not_sent_after_the_reconnect(
    proxied: BrokerSettings, proxy: FaultProxy, broker: Broker, name: str
) -> None:
    """The request's publish is still waiting for its confirm when the call times out: it is abandoned
    with the call, not sent again after the reconnect (to a server that would run it for nobody)."""
    async with _server(broker, name) as server, Broker(proxied) as b:
        async with RpcClient(b, name, timeout=10, reply_queue="exclusive") as client:
            assert await client.call("add", [0, 0]) == 0
            proxy.stall()  # nothing more reaches the broker on this connection: no confirm comes back
            with pytest.raises(RpcTimeout):
                await client.call("add", [1, 1], timeout=1)
            generation = b.generation
            proxy.cut()
            await wait_for(lambda: b.generation > generation and b.is_connected, 30)
            assert await client.call("add", [2, 2]) == 4
        assert b.republished == 0
    assert server.adds == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("outcome", ["reply", "connection lost"])
@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
async def test_a_reply_taken_in_the_loop_turn_the_deadline_fires_is_returned(
    broker: Broker, name: str, reply_queue: str, outcome: str
) -> None:
    """A reply the client took before its timeout's callback ran is the call's answer, not an RpcTimeout.

    The loop is held past the deadline so that two timers fall due together: the one handing the client its
    reply (through its own reply path, as a delivery would) and then the deadline's own. The call then wakes
    cancelled with the reply in hand; raising RpcTimeout there threw away an answer that had come in time (and
    invited a retry of work already done). A lost connection met the same way is raised as itself, without
    the timeout it met chained to it.
    """
    timeout = 2.0
    release = asyncio.Event()
    entered: list[int] = []
    server = RpcServer(broker, Queue(name, auto_delete=True))

    @server.method("add")
    async def add(pair: list[int]) -> int:
        entered.append(1)
        await release.wait()  # the real reply never comes in time: the one below does
        return pair[0] + pair[1]

    async with server:
        client = RpcClient(broker, name, reply_queue=reply_queue)  # type: ignore[arg-type]
        await client.start()
        try:
            loop = asyncio.get_running_loop()
            # Timed from before the call: its deadline timer, armed after this, is due later than the reply's.
            started = loop.time()
            calling = asyncio.ensure_future(client.call("add", [1, 2], timeout=timeout))
            await wait_for(lambda: len(entered) == 1, 5)
            (cid,) = client._pending
            future = client._pending[cid]
            waiting = hold_the_loop(started + timeout / 2 - loop.time(), timeout, calling, future)
            if outcome == "reply":
                loop.call_at(started + timeout * 0.9, client._complete, cid, b"3", "application/json")
                assert await asyncio.wait_for(calling, 10) == 3
            else:
                lost = ConnectionLost("the connection dropped")
                loop.call_at(started + timeout * 0.9, future.set_exception, lost)
                with pytest.raises(ConnectionLost) as raised:
                    await asyncio.wait_for(calling, 10)
                assert raised.value is lost and raised.value.__suppress_context__
            assert waiting == [True]  # the call was waiting for its reply when the loop was held
            assert client.dropped_replies == 0
        finally:
            release.set()
            await client.close()


@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
async def test_a_close_while_a_first_call_waits_for_the_start(
    broker: Broker, name: str, reply_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: the call made before close() and one made after it both failed with "the reply queue could not
    be declared again"; the first is told the client closed, and the second starts it again."""
    server = RpcServer(broker, Queue(f"{name}.rpc", auto_delete=True))

    @server.method("echo")
    async def echo(n: int) -> int:
        return n

    await server.start()
    client = RpcClient(broker, f"{name}.rpc", reply_queue=reply_queue)  # type: ignore[arg-type]
    consume, open_channel = broker.consume, type(broker.lowlevel).open_channel

    async def slow_consume(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.5)
        return await consume(*args, **kwargs)

    async def slow_open(self: Any, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.5)
        return await open_channel(self, *args, **kwargs)

    monkeypatch.setattr(broker, "consume", slow_consume)
    monkeypatch.setattr(type(broker.lowlevel), "open_channel", slow_open)
    try:
        first = asyncio.ensure_future(client.call("echo", 1, timeout=5))
        await asyncio.sleep(0.1)  # its start waits
        await client.close()
        second = asyncio.ensure_future(client.call("echo", 2, timeout=5))
        with pytest.raises(ConnectionLost, match="closed"):
            await first
        assert await second == 2
    finally:
        await client.close()
        await server.stop()
