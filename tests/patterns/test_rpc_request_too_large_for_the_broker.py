"""An RPC request over the broker's own ``max_message_size``, lower than amqpkit's (an operator's setting; RabbitMQ
4.0's default is 16 MiB), with other calls in flight on the same client.

Over direct reply-to, requests and replies share one channel, and RabbitMQ
closes the channel that carries a message over its limit (406
PRECONDITION_FAILED). The client failed every pending call with
ConnectionLost ("the reply channel closed"), the large one included, and did
so again at every such request (a hunt). The calls pending beside the first
one still lose their replies, which went to the closed channel: nothing
tells the broker's limit before it refuses. But the large call now fails
with MessageTooLarge, and the client keeps the limit: a later request over it
is refused before it is sent, and the calls beside it get their results. With
an exclusive reply queue the same request is MessageTooLarge and every other
call gets its result (the publish path knows the broker's size refusal).
"""

from __future__ import annotations

import asyncio
from typing import Literal

import pytest

from amqpkit import Broker, BrokerSettings, ConnectionLost, MessageTooLarge, Queue, RpcClient, RpcServer

from ..reliability.test_large_tasks import max_message_size_lowered

LIMIT = 1024 * 1024  # the node's, for the test; amqpkit's own stays 16 MiB
LARGE = "y" * (2 * LIMIT)


@pytest.mark.whole_broker  # every channel opened on the node while it runs gets the lowered max_message_size
@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
async def test_a_request_too_large_for_the_broker_fails_alone(
    broker: Broker, settings: BrokerSettings, name: str, reply_queue: Literal["direct", "exclusive"]
) -> None:
    server = RpcServer(broker, Queue(f"{name}.rpc", durable=True), concurrency=64)

    @server.method("slow")
    async def slow(text: str) -> int:
        await asyncio.sleep(1.0)
        return len(text)

    try:
        with max_message_size_lowered(LIMIT):
            async with (
                server,
                Broker(settings) as client_broker,
                RpcClient(client_broker, f"{name}.rpc", reply_queue=reply_queue) as client,
            ):
                assert await client.call("slow", "a", timeout=5) == 1
                rounds = []
                for _ in range(2):
                    calls = [asyncio.ensure_future(client.call("slow", "x" * n, timeout=5)) for n in range(20)]
                    await asyncio.sleep(0.2)  # all 20 are with the server
                    large = await asyncio.gather(client.call("slow", LARGE, timeout=5), return_exceptions=True)
                    rounds.append((large[0], await asyncio.gather(*calls, return_exceptions=True)))
    finally:
        await broker.delete_queue(f"{name}.rpc")
    for i, (large_outcome, results) in enumerate(rounds):
        assert isinstance(large_outcome, MessageTooLarge), f"round {i}: the large request ended {large_outcome!r}"
        failed = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        if reply_queue == "direct" and i == 0:
            # their replies went to the channel the broker closed
            assert all(isinstance(r, ConnectionLost) for r in results if isinstance(r, BaseException)), failed
            continue
        assert not failed, f"round {i}: {len(failed)} of 20 calls beside the large request failed, e.g. {failed[0]}"
