"""``Broker.wait_connected``: it ends, and says why when the Broker is not back."""

from __future__ import annotations

import asyncio
import time

import pytest

from amqpkit import Broker, ConnectionLost

from .proxy import FaultProxy, hold_out, let_in, proxied_settings

pytestmark = pytest.mark.timeout(60)


async def test_a_closed_broker_is_not_waited_for(amqp_url: str) -> None:
    """It waited for ever: nothing would ever connect a closed Broker again."""
    broker = Broker(amqp_url)
    await broker.connect()
    await broker.close()
    with pytest.raises(ConnectionLost, match="closed"):
        await asyncio.wait_for(broker.wait_connected(), 5)


async def test_a_close_ends_a_wait_under_way(proxy: FaultProxy, amqp_url: str) -> None:
    broker = Broker(proxied_settings(proxy, amqp_url))
    await broker.connect()
    await hold_out(proxy, broker)
    waiting = asyncio.ensure_future(broker.wait_connected())
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await broker.close()
    with pytest.raises(ConnectionLost, match="closed"):
        await asyncio.wait_for(waiting, 5)


async def test_a_wait_past_its_timeout_says_why(proxy: FaultProxy, amqp_url: str) -> None:
    """A plain TimeoutError said nothing: it is now ConnectionLost too, naming the outage, and still a
    TimeoutError for code that catches that."""
    async with Broker(proxied_settings(proxy, amqp_url)) as broker:
        await hold_out(proxy, broker)
        began = time.monotonic()
        with pytest.raises(ConnectionLost, match="not connected") as raised:
            await broker.wait_connected(0.5)
        assert isinstance(raised.value, TimeoutError)
        assert 0.4 < time.monotonic() - began < 2
        await let_in(proxy, broker)
        await broker.wait_connected(0)  # connected: returns at once, even with no time to wait


async def test_a_connection_back_and_lost_again_before_the_waiter_ran_is_waited_for(amqp_url: str) -> None:
    """Connected and lost again within a loop step (a node stopping just after the reconnect): the wait went on
    before, and after the first version of this change raised "not connected after None s" (a review)."""
    broker = Broker(amqp_url)  # never connected: the test drives its connected state by hand
    waiting = asyncio.ensure_future(broker.wait_connected())
    await asyncio.sleep(0.05)
    broker._connected.set()
    broker._connected.clear()
    await asyncio.sleep(0.2)
    assert not waiting.done(), waiting
    broker._connected.set()
    await asyncio.wait_for(waiting, 1)
