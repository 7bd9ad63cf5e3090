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
import time
from typing import Any

import pytest

from amqpkit import Broker, BrokerSettings, Exchange, Publisher, Subscriber

from ..waiting import wait_for

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


@pytest.mark.parametrize("kind", ["async-def", "def"])
async def test_a_stop_cut_short_lets_the_running_handler_finish_once(
    broker: Broker, settings: BrokerSettings, name: str, cleanup: list[str], kind: str
) -> None:
    """The stop, cut short during its grace, goes on in the background: the running handler gets its grace, and
    only then is the channel closed. The first fix for the leak above closed the channel at once, which gave the
    running message back to the queue: another subscriber ran it again beside a def handler's thread, and an
    async handler was cancelled mid-run (a review)."""
    exchange = Exchange(name, type="fanout")
    queue = f"{name}.q"
    cleanup += [f"q:{queue}", f"x:{name}"]
    runs: list[tuple[str, str]] = []

    def handler(label: str) -> Any:
        if kind == "def":

            def run(doc: dict[str, int]) -> None:
                runs.append((label, "start"))
                time.sleep(2.0)
                runs.append((label, "end"))

            return run

        async def run_async(doc: dict[str, int]) -> None:
            runs.append((label, "start"))
            await asyncio.sleep(2.0)
            runs.append((label, "end"))

        return run_async

    async with Broker(settings) as first_broker, Broker(settings) as second_broker:
        first = Subscriber(first_broker, exchange, handler("first"), queue=queue, prefetch=1)
        await first.start()
        await Publisher(broker, exchange).publish({"n": 1})
        await wait_for(lambda: ("first", "start") in runs, 5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first.stop(), 0.3)
        async with Subscriber(second_broker, exchange, handler("second"), queue=queue, prefetch=1):
            await asyncio.sleep(3.5)  # past the first run's end: a message given back would have run here
    assert runs == [("first", "start"), ("first", "end")], runs
    assert first.handled == 1
