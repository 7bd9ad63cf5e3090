"""RPC when someone else acts on the request queue while calls are in flight."""

from __future__ import annotations

import asyncio
import time

from amqpkit import Broker, BrokerSettings, Queue, RpcClient, RpcServer

from ..waiting import wait_for


async def test_calls_being_served_when_someone_deletes_the_request_queue_get_their_replies(
    broker: Broker, settings: BrokerSettings, name: str
) -> None:
    """Four calls are running in the server's handler (1.5 s each) when another client deletes the request queue.
    The reply goes to the caller's reply-to, which the deletion does not touch, so each call should end with its
    result. Before: the broker's cancel made the Broker close the consumer's channel at once, which cancelled the
    four handlers mid-run (after any side effect they had made); no reply was sent, the requests went with the
    queue (no redelivery), and each call waited out its whole 10 s timeout: 4 of 4 RpcTimeout, 0 handlers
    finished, while the log said the broker would deliver them again."""
    server = RpcServer(broker, Queue(f"{name}.rpc"), concurrency=4)
    started = finished = 0

    @server.method("slow")
    async def slow(n: int) -> int:
        nonlocal started, finished
        started += 1
        await asyncio.sleep(1.5)
        finished += 1
        return n * 2

    try:
        async with Broker(settings) as other, server, RpcClient(broker, f"{name}.rpc", timeout=10) as client:
            calls = [asyncio.ensure_future(client.call("slow", i, returns=int)) for i in range(4)]
            await wait_for(lambda: started >= 4, 10)
            began = time.monotonic()
            await other.delete_queue(f"{name}.rpc")
            results = await asyncio.gather(*calls, return_exceptions=True)
            took = time.monotonic() - began
            # The server is attached again (its queue declared again) and serves new calls: that part holds.
            assert await client.call("slow", 21, returns=int, timeout=5) == 42
        print(f"{finished - 1} of 4 handlers finished; the 4 calls ended {took:.2f} s after the delete: {results}")
        assert finished >= 4, f"{4 - (finished - 1)} of 4 handlers cancelled mid-run"
        assert results == [0, 2, 4, 6], f"{results} after {took:.1f} s"
    finally:
        await broker.delete_queue(f"{name}.rpc")
