"""A stream read across a restart of the broker's node.

On RabbitMQ 4.0.5 a node that has just started answers a declare of one of its streams, for a moment, with
404 NOT_FOUND "home node '...' of durable queue '...' in vhost '/' is down or inaccessible": the stream's
member is not back yet. The Broker's reconnect came within that moment, and took the 404 for a stream deleted
while it was away: it warned that the stream was new, forgot it and stopped its consumer for good (a hunt
stopped the orders and invoices services of the shop example in 1 of 2 restarts; 5 streams of 5 here). The
refusal is waited out now, as a refusal of access is: declared again, and the consumer attached, with the
reconnect policy's backoff, where it had got to.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from amqpkit import Broker, BrokerSettings, Delivery, Envelope, Queue, QueueType, ReconnectPolicy

from ..brokerctl import arabbitmqctl, start_app
from ..waiting import wait_for

STREAMS = 10  # the moment is short: several streams make it likelier that one declare lands in it


@pytest.mark.whole_broker
@pytest.mark.timeout(240)
async def test_streams_read_across_a_node_restart_are_declared_again_and_read_on_where_they_got_to(
    amqp_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = BrokerSettings(
        url=amqp_url, heartbeat=5, reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=0.25, jitter=0.1)
    )
    streams = [Queue(f"{name}.stream.{i}", type=QueueType.STREAM) for i in range(STREAMS)]
    offsets: dict[str, list[int]] = {s.name: [] for s in streams}
    forgotten: list[Any] = []

    async def take(delivery: Delivery[bytes]) -> None:
        offsets[delivery.routing_key].append(int(delivery.headers["x-stream-offset"]))
        await delivery.ack()

    caplog.set_level(logging.WARNING, logger="amqpkit")
    async with Broker(settings) as broker:
        broker.on_topology_error(lambda spec, exc: forgotten.append((spec, exc)))
        try:
            for stream in streams:
                await broker.declare_queue(stream)
                await broker.consume(stream, take, prefetch=50, arguments={"x-stream-offset": "first"})
                for n in range(3):
                    await broker.publish(Envelope(str(n).encode()), routing_key=stream.name)
            await wait_for(lambda: all(len(o) == 3 for o in offsets.values()), 30)
            await arabbitmqctl("stop_app")
            await start_app()
            await broker.wait_connected(timeout=60)
            await wait_for(lambda: all(c.attached.is_set() for c in broker.consumers), 60)
            assert not forgotten, [f"{getattr(spec, 'name', spec)}: {exc}" for spec, exc in forgotten]
            assert len(broker.consumers) == STREAMS, [c.error for c in broker.consumers]
            for stream in streams:
                await broker.publish(Envelope(b"after"), routing_key=stream.name)
            await wait_for(lambda: all(len(o) >= 4 for o in offsets.values()), 30)
            # read on where each got to: not from offset 0 again, as a stream taken for a new one would be
            assert all(o == [0, 1, 2, 3] for o in offsets.values()), offsets
            said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert not [line for line in said if "new stream" in line or "forgotten" in line], said
        finally:
            for consumer in broker.consumers:
                await consumer.cancel()
            for stream in streams:
                await broker.delete_queue(stream.name)
