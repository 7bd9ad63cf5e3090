"""An RpcClient's close() cancelled once it has begun: a timeout or a task cancel that lands while the client
closes (``async with asyncio.timeout(...): async with RpcClient(...) as c: ...`` whose deadline falls in the
exit; under a memory alarm a close takes its full 5 s bound, so any shorter timeout lands there).

The close hands the reply channel to aiormq to close (direct reply-to), or
cancels the reply consumer (exclusive reply queue); cancelled there, what it
had not done yet is never done: the channel stays open on the connection, and
with an exclusive reply queue the queue and its consumer stay on the broker,
for as long as the connection lasts. A service making a client per request
leaks one channel per such close, until the connection's ``channel_max``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import pytest

from amqpkit import Broker, BrokerSettings, Queue, RpcClient, RpcServer

from ..brokerctl import arabbitmqctl, vhost_args

CLIENTS = 20


def open_channels(broker: Broker) -> int:
    conn: Any = broker._conn
    return len(getattr(conn, "connection", conn).channels)


@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
async def test_a_close_cancelled_once_begun_leaves_no_channel_or_reply_queue(
    broker: Broker, settings: BrokerSettings, amqp_url: str, name: str, reply_queue: Literal["direct", "exclusive"]
) -> None:
    server = RpcServer(broker, Queue(f"{name}.rpc", auto_delete=True))

    @server.method("echo")
    async def echo(n: int) -> int:
        return n

    async with server, Broker(settings) as client_broker:
        async with RpcClient(client_broker, f"{name}.rpc", reply_queue=reply_queue) as first:
            assert await first.call("echo", -1, timeout=5) == -1  # the Broker's own channels (publish) opened
        before = open_channels(client_broker)
        for i in range(CLIENTS):
            client = RpcClient(client_broker, f"{name}.rpc", reply_queue=reply_queue)
            assert await client.call("echo", i, timeout=5) == i
            closing = asyncio.ensure_future(client.close())
            await asyncio.sleep(0)  # the close has begun: it waits for the broker
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
        await asyncio.sleep(1.0)  # anything the cancelled closes left to finish in the background
        channels = open_channels(client_broker) - before
        listed = await arabbitmqctl("list_queues", *vhost_args(amqp_url), "name")
        reply_queues = [line for line in listed.splitlines() if line.startswith("amq.gen-")]
        consumers = len(client_broker.consumers)
    assert (channels, len(reply_queues), consumers) == (0, 0, 0), (
        f"after {CLIENTS} clients whose close was cancelled once begun: {channels} channels left open, "
        f"{len(reply_queues)} reply queues left on the broker, {consumers} consumers still kept by the Broker"
    )
