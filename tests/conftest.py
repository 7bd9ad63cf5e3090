"""Fixtures: a real RabbitMQ, found in the order DESIGN.md gives, and unique names per test.

1. ``AMQP_URL`` from the environment;
2. a broker answering on 127.0.0.1:5672;
3. a throwaway testcontainers RabbitMQ when a Docker engine answers;
4. otherwise the run fails (it never skips) with how to start a broker.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from amqpkit import Broker, BrokerSettings, ReconnectPolicy

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"

HOW_TO_START = (
    "No RabbitMQ broker found. Set AMQP_URL, or start one on 127.0.0.1:5672 "
    "(`rabbitmq-server -detached`, or `apt-get install rabbitmq-server`), "
    "or run `docker compose up -d` in the project folder."
)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    env = os.environ.get("AMQP_URL")
    if env:
        yield env
        return
    if _answers("127.0.0.1", 5672):
        yield LOCAL_URL
        return
    if _docker_answers():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    pytest.fail(HOW_TO_START, pytrace=False)


@pytest.fixture
def settings(amqp_url: str) -> BrokerSettings:
    # Short heartbeat and fast reconnects keep fault tests quick.
    return BrokerSettings(
        url=amqp_url,
        heartbeat=5,
        reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=1.0, jitter=0.1),
        publish_timeout=15,
    )


@pytest.fixture
async def broker(settings: BrokerSettings) -> AsyncIterator[Broker]:
    async with Broker(settings) as b:
        yield b


@pytest.fixture
def name() -> str:
    """A unique name prefix for this test's exchanges and queues."""
    return f"test.{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def cleanup(broker: Broker) -> AsyncIterator[list[str]]:
    """Append queue or exchange names ('q:NAME' / 'x:NAME') to delete after the test."""
    names: list[str] = []
    yield names
    for item in names:
        kind, _, obj = item.partition(":")
        try:
            if kind == "q":
                await broker.delete_queue(obj)
            else:
                await broker.delete_exchange(obj)
        except Exception:  # noqa: S112 - best-effort cleanup; the test already reported
            continue
