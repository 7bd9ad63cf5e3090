"""An RpcClient's exclusive reply queue deleted by an operator (``rabbitmqctl delete_queue``) with calls pending.

The Broker hears of it at once (the broker cancels the reply consumer) and
declares a new server-named reply queue. Replies to the requests already sent
go to the old name, which no longer exists: the broker drops them. Those calls
can no longer get a reply, as when the direct reply-to channel closes, where
the client fails its pending calls at once ("replies to requests sent on a dead
channel can never arrive"). Here each waits out its whole timeout and is told
"no reply", though the server answered it.
"""

from __future__ import annotations

import asyncio
import time

from amqpkit import Broker, BrokerSettings, ConnectionLost, Queue, RpcClient, RpcServer

from ..brokerctl import arabbitmqctl, vhost_args
from ..waiting import wait_for

TIMEOUT = 10.0


async def test_calls_pending_when_the_reply_queue_is_deleted_do_not_wait_out_their_timeout(
    broker: Broker, settings: BrokerSettings, name: str
) -> None:
    server = RpcServer(broker, Queue(f"{name}.rpc", auto_delete=True))
    running = 0
    answer = asyncio.Event()  # the server answers once the reply queue is deleted (rabbitmqctl takes 0.5-2 s)

    @server.method("slow")
    async def slow(n: int) -> int:
        nonlocal running
        running += 1
        await answer.wait()
        return n

    async with (
        server,
        Broker(settings) as client_broker,
        RpcClient(client_broker, f"{name}.rpc", reply_queue="exclusive") as client,
    ):
        spec = client._reply_spec
        assert spec is not None
        old = client_broker.queue_name(spec)
        calls = [asyncio.ensure_future(client.call("slow", i, timeout=TIMEOUT)) for i in range(4)]
        await wait_for(lambda: running == 4, 5)  # each request is with the server, its reply to come
        await arabbitmqctl("delete_queue", *vhost_args(client_broker.current_url), old)
        deleted = time.monotonic()
        answer.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        took = time.monotonic() - deleted
        # The client has a new reply queue and works again: what remains is how the pending calls ended.
        await wait_for(lambda: client_broker.queue_name(spec) != old, 5)
        assert await client.call("slow", 9, timeout=TIMEOUT) == 9
    outcomes = [type(r).__name__ if isinstance(r, BaseException) else r for r in results]
    assert took < 3.0, (
        f"the 4 calls pending when the reply queue was deleted ended {took:.1f} s later "
        f"(timeout {TIMEOUT:g} s): {outcomes}"
    )
    assert all(isinstance(r, ConnectionLost) and "was deleted" in str(r) for r in results), outcomes
