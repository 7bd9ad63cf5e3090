"""Fixtures: a real RabbitMQ and a vhost of each test's own, from amqpkit's pytest plugin (amqpkit.testing).

The plugin finds the broker (``AMQP_URL``; a broker on 127.0.0.1:5672; a
testcontainers RabbitMQ where a Docker engine answers; else the run fails,
never skips, saying how to start one) and gives each test a fresh vhost
(``amqp_url``), deleted after it, so tests with fixed names (the tutorials'
``hello``, ``rpc_queue``, ...) never meet another test's or another run's.
``AMQPKIT_TEST_VHOST=0`` keeps the URL's own vhost. This file adds the
project's own fixtures on top (``settings``, ``broker``, ``name``, ``cleanup``).

Tests marked ``whole_broker`` (stop_app, alarms, closing every connection) run
while no other test runs against the node, in this run or in any other on the
machine: see ``brokerctl.broker_turn``.
"""

from __future__ import annotations

import functools
import gc
import itertools
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from amqpkit import Broker, BrokerSettings, ReconnectPolicy
from amqpkit.testing import own_vhost, vhost_of

from . import brokerctl, processes
from .reliability.proxy import FaultProxy, proxied_settings

SLOW_TIMEOUT = 1800  # seconds, for tests marked slow that do not set their own


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
        # Every fixture that reaches the broker under test depends on amqp_server_url: without it, a test
        # does the same work whichever RabbitMQ the run is against (CI's 4.x lane leaves such tests out).
        if "amqp_server_url" not in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker_free)


@pytest.fixture(scope="session")
def broker_url(amqp_server_url: str) -> str:
    """The broker's URL as found (its own vhost, usually '/')."""
    return amqp_server_url


@pytest.fixture
def amqp_url(amqp_url: str) -> Iterator[str]:
    """The plugin's per-test vhost; brokerctl (the fault proxy, vhost-only faults) is told which it is."""
    brokerctl.set_session_vhost(vhost_of(amqp_url) if own_vhost(amqp_url) else None)
    try:
        yield amqp_url
    finally:
        brokerctl.set_session_vhost(None)


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


# Every Broker made in this run, with the order it was made in: a test that leaves one open is named.
_made: weakref.WeakKeyDictionary[Broker, int] = weakref.WeakKeyDictionary()
_serial = itertools.count(1)


@pytest.fixture(scope="session", autouse=True)
def _brokers_recorded() -> Iterator[None]:
    original = Broker.__init__

    @functools.wraps(original)  # the signature stays Broker's own (tests/test_public_surface.py reads it)
    def recording(self: Broker, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _made[self] = next(_serial)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Broker, "__init__", recording)
        yield


def _left_open(broker: Broker) -> bool:
    """Connected, or reconnecting, and never closed: its tasks outlive the test and fail a later one."""
    return not broker._closing and (broker._conn is not None or broker._reconnect_task is not None)


@pytest.fixture(autouse=True)
def _no_broker_left_open(_brokers_recorded: None) -> Iterator[None]:
    """A Broker a test leaves open fails that test, not whichever later test its destroyed tasks warn in.

    Set up before the test's other fixtures, so it looks after theirs (``broker`` included) are closed.
    """
    first = next(_serial)
    yield
    left = [b for b, n in list(_made.items()) if n > first and _left_open(b)]
    if left:
        gc.collect()  # the warnings of its destroyed tasks land here too, not in a later test
        pytest.fail(f"the test left {len(left)} Broker(s) open (close them, also when it fails): {left}", pytrace=False)


@pytest.fixture
async def spawned() -> AsyncIterator[None]:
    """Ends, at the end of the test and whatever its outcome, every process it started with ``processes.spawn``."""
    processes.activate()
    try:
        yield
    finally:
        await processes.end_all()


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the broker (tests/reliability/proxy.py): cut, stall, slow or refuse."""
    host, port = urlsplit(amqp_url).hostname or "127.0.0.1", urlsplit(amqp_url).port or 5672
    p = await FaultProxy(host, port).start()
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def proxied(proxy: FaultProxy, amqp_url: str) -> BrokerSettings:
    """Through the fault proxy (only this test's connections are cut or stalled), with a 2 s heartbeat."""
    return proxied_settings(proxy, amqp_url)


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
