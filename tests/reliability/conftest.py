from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import pytest

from amqpkit import BrokerSettings, ReconnectPolicy

from .proxy import FaultProxy

HEARTBEAT = 2


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[FaultProxy]:
    parts = urlsplit(amqp_url)
    p = await FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    yield p
    await p.close()


@pytest.fixture
def proxied(proxy: FaultProxy, amqp_url: str) -> BrokerSettings:
    """Settings that reach the broker through the fault proxy, with a short heartbeat."""
    parts = urlsplit(amqp_url)
    return BrokerSettings(
        url=proxy.url(parts.username or "guest", parts.password or "guest"),
        heartbeat=HEARTBEAT,
        connect_timeout=5,
        publish_timeout=10,
        reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=1.0, jitter=0.1, connect_attempts=3),
    )


@pytest.fixture(scope="session")
def report() -> Iterator[dict[str, dict[str, object]]]:
    """Figures the reliability tests measured; written as JSON to $AMQPKIT_RELIABILITY_REPORT when set."""
    figures: dict[str, dict[str, object]] = {}
    yield figures
    path = os.environ.get("AMQPKIT_RELIABILITY_REPORT")
    if path:
        existing: dict[str, object] = {}
        if os.path.exists(path):
            with open(path) as f:
                existing = json.load(f)
        existing.update(figures)
        with open(path, "w") as f:
            json.dump(existing, f, indent=2, default=str)
