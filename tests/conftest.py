"""Fixtures: a real RabbitMQ, found in the order DESIGN.md gives, a vhost of the session's own, unique names.

The broker:

1. ``AMQP_URL`` from the environment;
2. a broker answering on 127.0.0.1:5672;
3. a throwaway testcontainers RabbitMQ when a Docker engine answers;
4. otherwise the run fails (it never skips) with how to start a broker.

When rabbitmqctl reaches that broker, the session makes a vhost of its own
(``amqpkit-test-<host>-<pid>-<random>``), so tests with fixed names (the tutorials' ``hello``,
``rpc_queue``, ...) do not meet another run's; it is deleted at the end.
``AMQPKIT_TEST_VHOST=0`` keeps the URL's own vhost.

Tests marked ``whole_broker`` (stop_app, alarms, closing every connection) run
while no other test runs against the node, in this run or in any other on the
machine: see ``brokerctl.broker_turn``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import unquote, urlsplit

import pytest

from amqpkit import Broker, BrokerSettings, ReconnectPolicy

from . import brokerctl, processes

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"

HOW_TO_START = (
    "No RabbitMQ broker found. Set AMQP_URL, or start one on 127.0.0.1:5672 "
    "(`rabbitmq-server -detached`, or `apt-get install rabbitmq-server`), "
    "or run `docker compose up -d` in the project folder."
)

SLOW_TIMEOUT = 1800  # seconds, for tests marked slow that do not set their own


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


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
def broker_url() -> Iterator[str]:
    """The broker's URL as found (its own vhost, usually '/')."""
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


def _opens(url: str) -> bool:
    """An AMQP connection to ``url`` opens (pika: a small synchronous client)."""
    import pika

    params = pika.URLParameters(url.split(",")[0].strip())
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 5
    try:
        pika.BlockingConnection(params).close()
    except Exception:
        return False
    return True


VHOST_PREFIX = "amqpkit-test-"
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:20] or "host"


def _delete_orphan_vhosts() -> None:
    """Delete the vhosts of earlier runs on this machine that were killed before their clean-up."""
    listed = brokerctl.rabbitmqctl("list_vhosts", "-q", "name", timeout=30).split()
    for vhost in listed:
        m = re.fullmatch(rf"{VHOST_PREFIX}{HOST}-(\d+)-[0-9a-f]+", vhost)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            brokerctl.rabbitmqctl("delete_vhost", vhost, timeout=120)


@contextlib.contextmanager
def _own_vhost(url: str) -> Iterator[str]:
    """A new vhost on the broker behind ``url``, for this session; yields ``url`` pointed at it.

    Only when rabbitmqctl reaches that same broker (checked by connecting into the new vhost);
    otherwise ``url`` itself.
    """
    if os.environ.get("AMQPKIT_TEST_VHOST") == "0" or not brokerctl.rabbitmqctl_available():
        yield url
        return
    vhost = f"{VHOST_PREFIX}{HOST}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    user = unquote(urlsplit(url.split(",")[0].strip()).username or "guest")
    made = False
    try:
        _delete_orphan_vhosts()
        brokerctl.rabbitmqctl("add_vhost", vhost, timeout=30)
        made = True
        brokerctl.rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*", timeout=30)
        own = brokerctl.with_vhost(url, vhost)
        usable = _opens(own)
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        usable = False
    if not usable:  # another broker than the one rabbitmqctl drives, or no rights there
        if made:
            with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
                brokerctl.rabbitmqctl("delete_vhost", vhost, timeout=60)
        yield url
        return
    brokerctl.set_session_vhost(vhost)
    try:
        yield own
    finally:
        brokerctl.set_session_vhost(None)
        with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
            brokerctl.rabbitmqctl("delete_vhost", vhost, timeout=120)


@pytest.fixture(scope="session")
def amqp_url(broker_url: str) -> Iterator[str]:
    """The URL tests use: into the session's own vhost when one could be made, else ``broker_url``."""
    with _own_vhost(broker_url) as url:
        yield url


@pytest.fixture(autouse=True)
def _broker_turn(request: pytest.FixtureRequest) -> Iterator[None]:
    """Whole-broker tests hold the node alone; every other test holds it shared (see brokerctl.broker_turn).

    ``whole_broker(vhost_only=True)``: the test acts on every connection of its vhost only, so it
    needs the node alone only when that vhost is shared with others.
    """
    marker = request.node.get_closest_marker("whole_broker")
    exclusive = marker is not None
    if marker is not None and marker.kwargs.get("vhost_only"):
        request.getfixturevalue("amqp_url")
        exclusive = brokerctl.session_vhost() is None
    with brokerctl.broker_turn(exclusive):
        yield


@pytest.fixture
async def spawned() -> AsyncIterator[None]:
    """Ends, at the end of the test and whatever its outcome, every process it started with ``processes.spawn``."""
    processes.activate()
    try:
        yield
    finally:
        await processes.end_all()


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
