"""Reconnects and the time spent disconnected, counted through the OTel metrics API (a cut through the fault proxy)."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

from amqpkit import Broker, BrokerSettings, ReconnectPolicy
from amqpkit.telemetry import hooks

from ..reliability.proxy import FaultProxy
from ..waiting import wait_for
from .conftest import Telemetry


async def test_a_cut_counts_a_reconnect_and_time_away(amqp_url: str, otel: Telemetry) -> None:
    parts = urlsplit(amqp_url)
    proxy = await FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    try:
        url = proxy.url(parts.username or "guest", parts.password or "guest")  # the test's own vhost
        settings = BrokerSettings(url=url, heartbeat=5, reconnect=ReconnectPolicy(initial_delay=0.2, max_delay=0.5))
        async with Broker(settings) as broker:
            proxy.refusing = True
            proxy.cut()
            await wait_for(lambda: not broker.is_connected)
            assert otel.total("amqpkit.connection.reconnects") == 0  # counted when it is back, not before
            proxy.refusing = False
            await wait_for(lambda: broker.reconnects == 1, timeout=30)
    finally:
        await proxy.close()
    assert otel.total("amqpkit.connection.reconnects") == 1
    assert otel.total("amqpkit.connection.disconnected.time") > 0


async def test_a_broker_closed_during_an_outage_closes_at_once_and_leaves_no_outage_behind(
    amqp_url: str, otel: Telemetry
) -> None:
    """Brokers closed while they reconnect, six rounds of three. Two defects, found together:

    - ``close()`` cancels the reconnect and waits for it. aiormq's connect, cancelled as the broker reset it, may
      end with the connection's error instead of the cancellation: the reconnect took that for one more failed
      attempt and went on, and ``close()`` waited for as long as the broker stayed away (a service stopped during
      an outage did not stop). Half of the runs of one round hung, before.
    - The time an outage began was kept by the Broker's id until it reconnected: a Broker closed during the outage
      left it for ever (8 of 10 in a hunt), and a later Broker given the same id would have counted that outage's
      time as its own at its first reconnect."""
    parts = urlsplit(amqp_url)
    proxy = await FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    took: list[float] = []
    left: list[int] = []
    try:
        url = proxy.url(parts.username or "guest", parts.password or "guest")
        settings = BrokerSettings(url=url, heartbeat=5, reconnect=ReconnectPolicy(initial_delay=0.2, max_delay=0.5))
        for _ in range(6):
            proxy.refusing = False
            brokers = [Broker(settings) for _ in range(3)]
            for broker in brokers:
                await broker.connect()
            proxy.refusing = True  # the broker "is down": every attempt is reset as it connects
            proxy.cut()
            await wait_for(lambda bs=brokers: not any(b.is_connected for b in bs))  # type: ignore[misc]
            for broker in brokers:
                started = asyncio.get_running_loop().time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(broker.close(), 5)
                took.append(asyncio.get_running_loop().time() - started)
            left.append(len(hooks._disconnected_at))
    finally:
        await proxy.close()
    hung = sum(t >= 5 for t in took)
    assert hung == 0, f"{hung} of {len(took)} closes still waiting after 5 s"
    assert left == [0] * 6  # before: 3, 6, 9, ...
