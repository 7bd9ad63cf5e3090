"""RPC calls in flight when the client's connection is cut: every call ends, and no future is left failed unread.

Issue 19: a node dying under an RpcClient with calls in flight logged asyncio's
"Future exception was never retrieved". Such a log means a call's future was
failed (by the disconnect) while the call itself ended another way, and nobody
looked at the future's error.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any, Literal

import pytest

from amqpkit import Broker, BrokerSettings, ConnectionLost, Queue, ReconnectPolicy, RpcClient, RpcServer, RpcTimeout

from ..reliability.proxy import FaultProxy, proxied_settings
from ..waiting import wait_for


@pytest.fixture
def proxied(proxy: FaultProxy, amqp_url: str) -> BrokerSettings:
    policy = ReconnectPolicy(initial_delay=0.05, max_delay=0.5, jitter=0.05, connect_attempts=3)
    return proxied_settings(proxy, amqp_url, reconnect=policy)


@contextlib.contextmanager
def unhandled() -> Any:
    """Collects what the loop's exception handler is given (a future failed and never read, ...)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        gc.collect()  # a future failed and never read says so when it is collected
        loop.set_exception_handler(previous)


@pytest.mark.parametrize("down_for", [0.0, 2.0, -1.0], ids=["reconnect-at-once", "down-2s", "silent"])
@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
async def test_calls_in_flight_at_a_cut_leave_no_unread_failure(
    proxied: BrokerSettings,
    proxy: FaultProxy,
    broker: Broker,
    name: str,
    reply_queue: Literal["direct", "exclusive"],
    down_for: float,
) -> None:
    """Calls keep starting before, during and after the cut (some wait for their reply, some are being
    sent, some wait for the reconnect); with ``down_for`` the node stays unreachable longer than a call's
    deadline, as while a cluster client moves to another node."""
    server = RpcServer(broker, Queue(name, auto_delete=True))

    @server.method("echo")
    async def echo(n: int) -> int:
        await asyncio.sleep(0.05)
        return n

    outcomes: dict[str, int] = {}

    async def one(client: RpcClient, n: int) -> None:
        try:
            assert await client.call("echo", n, returns=int, timeout=1.5) == n
            kind = "ok"
        except (ConnectionLost, RpcTimeout) as exc:
            kind = type(exc).__name__
        outcomes[kind] = outcomes.get(kind, 0) + 1

    with unhandled() as seen:
        async with server, Broker(proxied) as b, RpcClient(b, name, reply_queue=reply_queue) as client:
            assert await client.call("echo", -1, returns=int) == -1
            calls: list[asyncio.Task[None]] = []
            generation = b.generation
            for i in range(300 if down_for >= 0 else 2000):
                calls.append(asyncio.ensure_future(one(client, i)))
                if i == 100 and down_for < 0:
                    proxy.stall()  # the node goes silent: the heartbeat finds it dead
                elif i == 100:
                    proxy.refusing = down_for > 0
                    proxy.cut()
                    if down_for:
                        asyncio.get_running_loop().call_later(down_for, setattr, proxy, "refusing", False)
                await asyncio.sleep(0.002)
            await asyncio.wait_for(asyncio.gather(*calls), 30)  # every call ends
            await wait_for(lambda: b.generation > generation and b.is_connected, 30)
            assert await client.call("echo", 7, returns=int) == 7
    assert sum(outcomes.values()) == len(calls)
    assert outcomes.get("ConnectionLost", 0) > 0, outcomes  # the cut did fail calls in flight
    never_read = [c.get("message", "") for c in seen]
    assert never_read == [], never_read
