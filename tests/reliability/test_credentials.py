"""Credentials never appear in logs, reprs or error texts: through connect failures, reconnects and errors."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

from amqpkit import (
    Broker,
    BrokerSettings,
    ConnectError,
    Envelope,
    PublishError,
    Queue,
    ReconnectPolicy,
    TopologyError,
)

from ..brokerctl import own_user
from ..waiting import wait_for
from .proxy import FaultProxy

PASSWORD = f"Pw-{uuid.uuid4().hex[:12]}-secret"


@pytest.fixture  # per test, as amqp_url is: the user gets rights on this test's vhost
def user(amqp_url: str) -> Iterator[str]:
    with own_user(amqp_url, "amqpkit", PASSWORD) as name:
        yield name


@pytest.fixture
def everything_logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # every logger: amqpkit, aiormq, asyncio
    return caplog


async def test_no_password_anywhere(
    user: str, proxy: FaultProxy, name: str, everything_logged: pytest.LogCaptureFixture
) -> None:
    texts: list[str] = []
    fast = ReconnectPolicy(initial_delay=0.02, max_delay=0.2, connect_attempts=2)

    # 1. Connect failures: nothing listening, and a wrong password.
    for url in (f"amqp://{user}:{PASSWORD}@127.0.0.1:1/", f"amqp://{user}:wrong-{PASSWORD}@127.0.0.1:{proxy.port}/"):
        settings = BrokerSettings(url=url, reconnect=fast, connect_timeout=3)
        texts += [repr(settings), str(settings)]
        with pytest.raises(ConnectError) as info:
            await Broker(settings).connect()
        texts += [str(info.value), repr(info.value)]
        assert "127.0.0.1" in str(info.value)

    # 2. Reconnects through cuts, with errors on the way.
    settings = BrokerSettings(url=proxy.url(user, PASSWORD), heartbeat=2, reconnect=fast)
    async with Broker(settings) as broker:
        texts.append(repr(broker))
        queue = f"{name}.cred"
        await broker.declare_queue(Queue(queue, message_ttl=1))
        for _ in range(3):
            generation = broker.generation
            proxy.cut()
            await wait_for(lambda g=generation: broker.generation > g and broker.is_connected, 30)  # type: ignore[misc]
        with pytest.raises(TopologyError) as drift:
            await broker.declare_queue(Queue(queue, message_ttl=2))
        texts += [str(drift.value), repr(drift.value)]
        with pytest.raises(PublishError) as missing:
            await broker.publish(Envelope(b"x"), exchange=f"{name}.no-such-exchange")
        texts += [str(missing.value), repr(missing.value)]
        await broker.delete_queue(queue)
    assert broker.reconnects == 3

    logged = everything_logged.text + "\n".join(
        str(r.exc_info[1]) for r in everything_logged.records if r.exc_info and r.exc_info[1]
    )
    assert everything_logged.records, "nothing was logged: the check would prove nothing"
    assert "lost" in logged
    assert "reconnected" in logged
    for text in [*texts, logged]:
        assert PASSWORD not in text
