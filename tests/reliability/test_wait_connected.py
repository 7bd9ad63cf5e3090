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
