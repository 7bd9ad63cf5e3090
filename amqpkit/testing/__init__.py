"""pytest plugin: test against a real RabbitMQ, each test in a fresh vhost.

Registered with the ``pytest11`` entry point ``amqpkit``, so it is active once
amqpkit is installed (``pytest -p no:amqpkit`` turns it off). Fixtures:

- ``amqp_url``: the AMQP URL of a vhost made for this test and deleted after
  it. Nothing a test declares is seen by another test, in this run or in any
  other against the same broker.
- ``amqp_settings``: :class:`~amqpkit.BrokerSettings` for ``amqp_url`` with
  a short heartbeat and fast reconnects (override it to change them).
- ``amqp_broker``: a connected :class:`~amqpkit.Broker` on that vhost.
- ``service_runner``: ``await service_runner(service)`` starts a
  :class:`~amqpkit.service.Service` in-process on that vhost and returns the
  :class:`~amqpkit.service.RunningService`; it is stopped after the test.
- ``amqp_server_url`` (session): the broker as found, in its own vhost.

The broker is found in this order, never skipped and never faked:
``AMQP_URL``; a broker answering on ``127.0.0.1:5672``; a throwaway
testcontainers RabbitMQ where a Docker engine answers; else the run fails
saying how to start one.

Vhosts are made through the management HTTP API when it answers
(``AMQPKIT_MANAGEMENT_URL``, else port 15672 on the broker's host with the
URL's user), else with ``rabbitmqctl`` on this machine
(``AMQPKIT_RABBITMQCTL_NODE`` names another node; ``AMQPKIT_RABBITMQCTL``, a
command line, stands in for ``rabbitmqctl`` itself). rabbitmqctl takes a
second or two per call, so it makes vhosts a few at a time ahead of need and
deletes used ones in batches in the background; every one is gone by the
end of the session, and the next session deletes those of a killed run.
``AMQPKIT_TEST_VHOST=0`` turns vhosts off: every test then uses the URL's
own vhost, shared.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest

from ..connection import Broker
from ..service import RunningService, Service
from ..settings import BrokerSettings, ReconnectPolicy
from .vhosts import ACTING_USER as ACTING_USER
from .vhosts import CTL_ENV as CTL_ENV
from .vhosts import HOST as HOST
from .vhosts import NO_VHOSTS as NO_VHOSTS
from .vhosts import NODE_ENV as NODE_ENV
from .vhosts import VHOST_PREFIX as VHOST_PREFIX
from .vhosts import VhostPool, own_vhost, vhost_of, vhost_pool, with_vhost
from .vhosts import ctl_command as ctl_command

try:
    import pytest_asyncio
except ImportError:  # the async fixtures then fail, saying what is missing
    pytest_asyncio = None  # type: ignore[assignment]

__all__ = ["ServiceRunner", "VhostPool", "find_broker", "own_vhost", "vhost_of", "with_vhost"]

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"
HOW_TO_START = (
    "No RabbitMQ broker found. Set AMQP_URL, or start one on 127.0.0.1:5672 "
    "(`rabbitmq-server -detached`, or `apt-get install rabbitmq-server`), "
    "or run `docker compose up -d` in the amqpkit checkout, or start Docker for a testcontainers broker."
)


# ---------------------------------------------------------------------- finding the broker


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


@contextlib.contextmanager
def find_broker() -> Iterator[tuple[str, str | None]]:
    """(AMQP URL, management URL or None) of the broker to test against; fails the run if there is none."""
    env = os.environ.get("AMQP_URL")
    if env:
        yield env, os.environ.get("AMQPKIT_MANAGEMENT_URL")
        return
    if _answers("127.0.0.1", 5672):
        yield LOCAL_URL, os.environ.get("AMQPKIT_MANAGEMENT_URL")
        return
    if _docker_answers():
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:4.0-management").with_exposed_ports(15672)
        with container:
            host = container.get_container_host_ip()
            amqp = f"amqp://guest:guest@{host}:{container.get_exposed_port(5672)}/"
            yield amqp, f"http://guest:guest@{host}:{container.get_exposed_port(15672)}"
        return
    pytest.fail(HOW_TO_START, pytrace=False)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def amqp_server_url() -> Iterator[str]:
    """The broker's URL as found (its own vhost, usually '/')."""
    with find_broker() as (url, management):
        if management is not None:
            _container_management[url] = management
        yield url


@pytest.fixture(scope="session")
def amqp_vhosts(amqp_server_url: str) -> Iterator[VhostPool | None]:
    """Where per-test vhosts come from (None with AMQPKIT_TEST_VHOST=0)."""
    if os.environ.get("AMQPKIT_TEST_VHOST") == "0":
        yield None
        return
    management = os.environ.get("AMQPKIT_MANAGEMENT_URL") or _container_management.get(amqp_server_url)
    pool = vhost_pool(amqp_server_url, management)
    try:
        yield pool
    finally:
        pool.close()


_container_management: dict[str, str] = {}


@pytest.fixture
def amqp_url(amqp_server_url: str, amqp_vhosts: VhostPool | None) -> Iterator[str]:
    """The AMQP URL of a vhost made for this test, deleted after it."""
    if amqp_vhosts is None:
        yield amqp_server_url
        return
    vhost = amqp_vhosts.acquire()
    try:
        yield with_vhost(amqp_server_url, vhost)
    finally:
        amqp_vhosts.release(vhost)


@pytest.fixture
def amqp_settings(amqp_url: str) -> BrokerSettings:
    """Settings for ``amqp_url``: a short heartbeat and fast reconnects, so that fault tests stay quick."""
    return BrokerSettings(
        url=amqp_url,
        heartbeat=5,
        reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=1.0, jitter=0.1),
        publish_timeout=15,
    )


class ServiceRunner:
    """Starts services in-process for one test; each is stopped when the test ends."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self._running: list[tuple[RunningService, float]] = []

    async def start(
        self,
        service: Service,
        *,
        settings: BrokerSettings | None = None,
        grace: float = 5.0,
        give_up_after: float | None = None,
    ) -> RunningService:
        """Start ``service`` (on this test's vhost unless ``settings`` says otherwise); returns it running."""
        running = RunningService(service, settings=settings or self.settings, give_up_after=give_up_after)
        await running.start()
        self._running.append((running, grace))
        return running

    __call__ = start

    async def stop_all(self) -> None:
        while self._running:
            running, grace = self._running.pop()
            await running.stop(grace=grace)


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def amqp_broker(amqp_settings: BrokerSettings) -> AsyncIterator[Broker]:
        """A connected Broker on this test's vhost."""
        async with Broker(amqp_settings) as broker:
            yield broker

    @pytest_asyncio.fixture
    async def service_runner(amqp_settings: BrokerSettings) -> AsyncIterator[ServiceRunner]:
        """``await service_runner(service)``: the service running on this test's vhost, stopped after the test."""
        runner = ServiceRunner(amqp_settings)
        try:
            yield runner
        finally:
            await runner.stop_all()

else:

    @pytest.fixture
    def amqp_broker() -> None:
        pytest.fail("amqp_broker is an async fixture: pip install pytest-asyncio", pytrace=False)

    @pytest.fixture
    def service_runner() -> None:
        pytest.fail("service_runner is an async fixture: pip install pytest-asyncio", pytrace=False)
