"""A connect cut short by its caller ends at once: on a broker that accepts the TCP connection and says nothing.

aiormq ends such a connect, cancelled while it waits for the broker's first frame, with "the connection's reader
stopped" instead of the cancellation. The Broker took that for one more failed attempt and went on: a cancelled
``connect()`` tried twice more, 10 s each (the connect timeout), and raised ConnectError after 20 s; an
``asyncio.timeout(1)`` around it gave a ConnectError after 20 s, not a TimeoutError after 1; ``amqpkit run``
stopped with SIGTERM during its start waited for the same.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import pytest

from amqpkit import Broker, BrokerSettings, ConnectError, ReconnectPolicy

from .. import processes


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts connections and never writes to them (a broker hung before its first frame)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


def silent_settings(port: int) -> BrokerSettings:
    return BrokerSettings(
        url=f"amqp://guest:guest@127.0.0.1:{port}/",
        connect_timeout=10,
        reconnect=ReconnectPolicy(initial_delay=0.01, max_delay=0.02, connect_attempts=3),
    )


async def test_a_cancelled_connect_is_cancelled_at_once(silent_port: int) -> None:
    broker = Broker(silent_settings(silent_port))
    connecting = asyncio.create_task(broker.connect())
    await asyncio.sleep(0.5)
    cancelled_at = time.monotonic()
    connecting.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await connecting
        assert time.monotonic() - cancelled_at < 2
    finally:
        await broker.close()


async def test_a_timeout_around_connect_is_a_timeout(silent_port: int) -> None:
    broker = Broker(silent_settings(silent_port))
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1):
                await broker.connect()
        assert time.monotonic() - started < 3
    finally:
        await broker.close()


@pytest.mark.usefixtures("spawned")
async def test_amqpkit_run_stopped_during_its_connect_ends_at_once(silent_port: int) -> None:
    proc = await processes.spawn(
        sys.executable, "-m", "amqpkit.cli", "run", "tests.service.apps:workers",
        "--url", f"amqp://guest:guest@127.0.0.1:{silent_port}/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    await asyncio.sleep(3)  # started, and waiting for the broker's first frame
    assert proc.returncode is None
    proc.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    took = time.monotonic() - stopped_at
    assert took < 5, (took, out.decode()[-2000:])
    assert b"Traceback" not in out, out.decode()[-2000:]


async def test_an_attempt_out_of_time_says_so(silent_port: int) -> None:
    """The attempt's own timeout, which aiormq also ended with "the connection's reader stopped": said as a timeout."""
    settings = silent_settings(silent_port).model_copy(update={"connect_timeout": 0.5})
    started = time.monotonic()
    with pytest.raises(ConnectError) as info:
        await Broker(settings).connect()
    assert "timed out after 0.5 s" in str(info.value)
    assert "after 3 attempts" in str(info.value)
    assert time.monotonic() - started < 5
