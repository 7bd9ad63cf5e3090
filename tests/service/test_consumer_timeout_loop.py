"""A service's subscriber or RPC handler held past the broker's ``consumer_timeout`` runs again, for ever.

Found by a hunt. RabbitMQ closes a channel whose delivery is not acknowledged within ``consumer_timeout``
(30 minutes by default; a queue's own with the ``consumer-timeout`` policy key on 3.12+/4.x, which an
operator may set) and puts the delivery back. The Worker handles this (the held task is named, its copy
never loops: tests/patterns/test_long_tasks.py). A Subscriber and an RpcServer do not: the async handler is
cancelled with its channel ("consumer ... lost its channel; re-attaching", a WARNING that does not say
why), the delivery comes back and the handler starts again, every timeout, for as long as the process runs;
the RPC caller ends with RpcTimeout while the method ran over and over. Measured on a RabbitMQ 4.0.5 node
with consumer_timeout 3 s (6 s handlers): 8 starts of each in 25 s, the call RpcTimeout at its 30 s.

On a node of the test's own (tests.brokerctl.consumer_timeout_node, 3.10: 5 s, checked every second).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from amqpkit import Broker, BrokerSettings, Exchange, Publisher, RpcClient
from amqpkit.errors import RemoteError
from amqpkit.service import Service

from ..brokerctl import SpareNode, consumer_timeout_node


@pytest.fixture(scope="module")
def timeout_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpareNode]:
    with consumer_timeout_node(tmp_path_factory.mktemp("consumer-timeout-svc"), 5000) as node:
        yield node


@pytest.mark.timeout(240)
async def test_a_handler_past_consumer_timeout_is_not_run_again_and_again(
    timeout_node: SpareNode, caplog: pytest.LogCaptureFixture
) -> None:
    starts = {"subscriber": 0, "rpc": 0}
    svc = Service("slow")
    events = Exchange("slow.events", type="fanout")

    @svc.subscriber(events, queue="slow.events")
    async def listen(n: int) -> None:
        starts["subscriber"] += 1
        await asyncio.sleep(8)

    @svc.rpc("slow.rpc")
    async def slow(n: int) -> int:
        starts["rpc"] += 1
        await asyncio.sleep(8)
        return n

    settings = BrokerSettings(url=timeout_node.url)
    try:
        async with svc.serve(settings, grace=1) as running, RpcClient(running.broker, "slow.rpc") as client:
            await Publisher(running.broker, events).publish(1)
            with pytest.raises(RemoteError) as refused:  # 8 s of work; the call gives it 25 s
                await client.call("slow", 1, timeout=25)
            await asyncio.sleep(6)  # past one more timeout: a copy run again would have started by now
    finally:
        async with Broker(settings) as broker:
            await broker.delete_queue("slow.events")
            await broker.delete_exchange(events)
    assert starts == {"subscriber": 1, "rpc": 1}
    # the caller is told why, as soon as the copy comes back, rather than waiting out its timeout
    assert refused.value.remote_type == "ConsumerTimeoutExceeded", refused.value
    # said on the subscriber's and the RPC server's loggers (before: on amqpkit.worker, in a service without a worker)
    said = {r.name for r in caplog.records if "past the broker's consumer_timeout" in r.getMessage()}
    assert said == {"amqpkit.pubsub", "amqpkit.rpc"}, said
