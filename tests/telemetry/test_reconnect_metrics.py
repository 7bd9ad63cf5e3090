"""Reconnects and the time spent disconnected, counted through the OTel metrics API (a cut through the fault proxy)."""

from __future__ import annotations

from urllib.parse import urlsplit

from amqpkit import Broker, BrokerSettings, ReconnectPolicy

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
