"""A Subscriber's stop() given less time than its grace (``asyncio.wait_for(sub.stop(), 0.3)`` while a handler
runs, a shutdown budget, a task cancelled during the stop).

The stop cancels the consumer on the broker, then waits up to ``grace`` (5 s)
for the running handlers, and only then closes the consumer's channel. Cancelled
during that wait, the channel is never closed: the Broker has already let go of
it (``Consumer._channel`` is None), so nothing closes it until the connection
goes. The same holds for any ``Consumer.cancel()`` (``Broker._detach``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from amqpkit import Broker, BrokerSettings, Exchange, Publisher, Subscriber

STOPS = 10


def open_channels(broker: Broker) -> int:
    conn: Any = broker._conn
    return len(getattr(conn, "connection", conn).channels)


async def test_a_stop_cut_short_during_its_grace_leaves_no_channel_open(
    broker: Broker, settings: BrokerSettings, name: str, cleanup: list[str]
) -> None:
    exchange = Exchange(name, type="fanout")
    queue = f"{name}.q"
    cleanup += [f"q:{queue}", f"x:{name}"]

    async def slow(doc: dict[str, int]) -> None:
        await asyncio.sleep(1.0)

    publisher = Publisher(broker, exchange)
    async with Broker(settings) as sub_broker:
        async with Subscriber(sub_broker, exchange, slow, queue=queue, prefetch=1):
            pass  # the Broker's own channels (topology) are open from here
        before = open_channels(sub_broker)
        for n in range(STOPS):
            sub = Subscriber(sub_broker, exchange, slow, queue=queue, prefetch=1)
            await sub.start()
            await publisher.publish({"n": n})
            await asyncio.sleep(0.1)  # the handler is running
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.stop(), 0.3)
        await asyncio.sleep(2.0)  # every handler has ended
        left = open_channels(sub_broker) - before
        consumers = len(sub_broker.consumers)
    assert (left, consumers) == (0, 0), (
        f"{STOPS} stops cut short during their grace left {left} channels open ({consumers} consumers kept)"
    )
