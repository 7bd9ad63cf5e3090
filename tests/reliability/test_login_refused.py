"""The broker refuses the login: on the first connect, and at the reconnects of a running Broker.

An operator changes the user's password, deletes the user, or clears its permissions on the vhost, and the
connection drops (here the fault proxy cuts it; deleting a user closes its connections by itself). The
Broker keeps trying, with its backoff, since access may be given back; meanwhile what waits for the connection
fails at its deadline with :class:`AccessRefused` (also the error it raised before, for code that catches that),
and the log says once that the login is refused and once that it is no longer. Each test has a vhost and a user
of its own, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest

from amqpkit import (
    AccessRefused,
    Broker,
    BrokerSettings,
    ConnectError,
    ConnectionLost,
    Delivery,
    Envelope,
    PublishTimeout,
    Queue,
    ReconnectPolicy,
    RpcClient,
    RpcServer,
    RpcTimeout,
    Service,
    Worker,
    WorkQueue,
)
from amqpkit.testing import own_vhost, vhost_of

from ..brokerctl import arabbitmqctl, made_user, made_vhost, rabbitmqctl_available, with_vhost
from ..waiting import wait_for
from .proxy import FaultProxy

pytestmark = pytest.mark.skipif(not rabbitmqctl_available(), reason="needs rabbitmqctl")

PASSWORD = f"Login-{uuid.uuid4().hex[:10]}-secret"
FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.3, jitter=0.05)


@pytest.fixture
def vhost(amqp_url: str) -> Iterator[str]:
    """The test's own vhost: the plugin's when it made one for this test, else one made here (the test closes
    every connection of its vhost)."""
    if own_vhost(amqp_url):
        yield vhost_of(amqp_url)
        return
    with made_vhost("amqpkit-login") as name:
        yield name


@pytest.fixture
def user(vhost: str) -> Iterator[str]:
    with made_user("amqpkit-login", vhost, PASSWORD) as name:
        yield name


def as_user(
    amqp_url: str, vhost: str, user: str, password: str = PASSWORD, *, via: FaultProxy | None = None, **overrides: Any
) -> BrokerSettings:
    """Settings for ``user`` on ``vhost``: straight to the broker, or through the fault proxy ``via``."""
    if via is not None:
        url = via.url(user, password, vhost)
    else:
        host = amqp_url.split("@", 1)[1].split("/", 1)[0]
        url = with_vhost(f"amqp://{user}:{password}@{host}/", vhost)
    options: dict[str, Any] = {"heartbeat": 5, "reconnect": FAST, "publish_timeout": 1, **overrides}
    return BrokerSettings(url=url, **options)


async def refuse(how: str, vhost: str, user: str, proxy: FaultProxy) -> None:
    """Make the broker refuse ``user``'s next login on ``vhost``, and drop its connections (through ``proxy``)."""
    if how == "password":
        await arabbitmqctl("change_password", user, "changed-by-the-operator")
    elif how == "permission":
        await arabbitmqctl("clear_permissions", "-p", vhost, user)
    else:
        await arabbitmqctl("delete_user", user)  # closes the user's connections
    if how != "user deleted":
        assert proxy.cut() >= 1


async def give_back(how: str, vhost: str, user: str) -> None:
    if how == "password":
        await arabbitmqctl("change_password", user, PASSWORD)
        return
    if how == "user deleted":
        await arabbitmqctl("add_user", user, PASSWORD)
    await arabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")


async def failure(awaitable: Awaitable[object]) -> BaseException | None:
    """What ``awaitable`` raised (None when it did not)."""
    try:
        await awaitable
    except Exception as exc:
        return exc
    return None


def no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text
        assert "changed-by-the-operator" not in text


async def test_a_first_connect_the_broker_refuses_fails_at_once_with_access_refused(
    amqp_url: str, vhost: str, user: str
) -> None:
    for how in ("password", "permission"):
        if how == "password":
            settings = as_user(amqp_url, vhost, user, password="not-the-password")
        else:
            await arabbitmqctl("clear_permissions", "-p", vhost, user)
            settings = as_user(amqp_url, vhost, user)
        broker = Broker(settings.model_copy(update={"reconnect": ReconnectPolicy(initial_delay=1, connect_attempts=5)}))
        started = time.monotonic()
        with pytest.raises(AccessRefused) as info:
            await broker.connect()
        assert time.monotonic() - started < 3  # not retried ("after 1 attempt" below), nor left to hang
        assert isinstance(info.value, ConnectError) and info.value.reason == "refused"
        text = str(info.value)
        assert "after 1 attempt" in text
        assert ("ACCESS_REFUSED" if how == "password" else f"access to vhost '{vhost}' refused") in text, text
        assert "not-the-password" not in text + repr(info.value)
        no_secret(text, repr(info.value))
        await broker.close()


@pytest.mark.parametrize("how", ["password", "permission"])
async def test_a_refused_reconnect_is_named_keeps_trying_and_gets_back(
    amqp_url: str, vhost: str, user: str, how: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a publish ended with PublishTimeout "(broker not reachable)", a consume with ConnectionLost "the
    reconnect did not finish in time", and the log said WARNING "connect to ... failed: ACCESS_REFUSED ..." at
    every attempt (about two a second with a backoff of at most 0.5 s; one every 5 s by default, for ever)."""
    caplog.set_level(logging.DEBUG, logger="amqpkit")
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def handler(delivery: Delivery[bytes]) -> None:
        await received.put(delivery.body)
        await delivery.ack()

    async with Broker(as_user(amqp_url, vhost, user, via=proxy)) as broker:
        queue = Queue("orders")
        consumer = await broker.consume(queue, handler)
        assert broker.access_refused is None
        mark = len(caplog.records)
        await refuse(how, vhost, user, proxy)
        await wait_for(lambda: broker.access_refused is not None, 5)
        # What waits for the connection meanwhile fails at its deadline, with the cause, typed.
        started = time.monotonic()
        published, consumed, attached = await asyncio.gather(
            failure(broker.publish(Envelope(b"lost?"), routing_key="orders", timeout=1)),
            failure(broker.consume(Queue("other"), handler)),
            failure(broker.consume(queue, handler, declare=False)),
        )
        # Each at its deadline (1 s); before, a consume of a queue it need not declare waited for it twice.
        assert time.monotonic() - started < 1.6
        assert isinstance(published, AccessRefused) and isinstance(published, PublishTimeout), repr(published)
        for error in (consumed, attached):
            assert isinstance(error, AccessRefused) and isinstance(error, ConnectionLost), repr(error)
        assert broker.consumers == (consumer,)
        expected = "ACCESS_REFUSED" if how == "password" else f"access to vhost '{vhost}' refused"
        for error in (published, consumed, attached):
            assert "refused" in str(error) and expected in str(error), str(error)
            assert f"vhost '{vhost}'" in str(error)
        assert "not confirmed within 1 s" in str(published)
        assert expected in (broker.access_refused or "")
        # It kept trying meanwhile, and said so once.
        await wait_for(lambda: len(attempts(caplog.records[mark:])) >= 4, 5)
        during = caplog.records[mark:]
        refusals = [r for r in during if r.levelno >= logging.WARNING and "refused" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        assert refusals[0].levelno == logging.ERROR
        assert expected in refusals[0].getMessage()
        mark = len(caplog.records)
        await give_back(how, vhost, user)
        await broker.wait_connected(5)
        assert broker.access_refused is None
        await wait_for(consumer.attached.is_set, 5)
        await broker.publish(Envelope(b"back"), routing_key="orders")
        assert await asyncio.wait_for(received.get(), 5) == b"back"
        after = [r.getMessage() for r in caplog.records[mark:] if r.levelno >= logging.INFO]
        ended = [m for m in after if "reconnected" in m]
        assert len(ended) == 1 and "refused" in ended[0], after
        assert not [m for m in after if "connect to" in m], after
    no_secret(caplog.text, str(published), repr(published), str(consumed))


def attempts(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """The records of refused connect attempts (at DEBUG once the refusal has been said)."""
    return [r for r in records if r.getMessage().startswith("connect to") and "refused" in r.getMessage().lower()]


async def test_an_rpc_call_and_a_worker_while_the_user_is_deleted(
    amqp_url: str, vhost: str, user: str, name: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """An RpcClient's call ended with RpcTimeout "no reply ... within 1 s", which said nothing of the cause, and an
    enqueue with PublishTimeout "(broker not reachable)"; the Worker is attached again once the user is back."""
    caplog.set_level(logging.DEBUG, logger="amqpkit")
    done: list[int] = []
    guest = BrokerSettings(url=with_vhost(amqp_url, vhost), heartbeat=5, reconnect=FAST)
    async with Broker(guest) as server_broker, Broker(as_user(amqp_url, vhost, user, via=proxy)) as broker:
        server = RpcServer(server_broker, f"{name}.rpc")

        @server.method("add")
        async def add(n: int) -> int:
            return n + 1

        await server.start()
        work = WorkQueue(broker, f"{name}.tasks")

        async def handle(task: dict[str, int]) -> None:
            done.append(task["n"])

        worker = Worker(work, handle, concurrency=1)
        await worker.start()
        client = RpcClient(broker, f"{name}.rpc")
        try:
            assert await client.call("add", 1, timeout=5) == 2
            await refuse("user deleted", vhost, user, proxy)
            await wait_for(lambda: broker.access_refused is not None, 5)
            called, enqueued = await asyncio.gather(
                failure(client.call("add", 2, timeout=1)), failure(work.enqueue({"n": 1}, timeout=1))
            )
            assert isinstance(called, AccessRefused) and isinstance(called, RpcTimeout), repr(called)
            assert isinstance(enqueued, AccessRefused) and isinstance(enqueued, PublishTimeout), repr(enqueued)
            for error in (called, enqueued):
                assert "ACCESS_REFUSED" in str(error), str(error)
            # A task sent by someone else meanwhile is done once the user is back: the worker is attached again.
            await WorkQueue(server_broker, f"{name}.tasks").enqueue({"n": 2})
            await give_back("user deleted", vhost, user)
            await broker.wait_connected(5)
            assert await client.call("add", 3, timeout=5) == 4
            await wait_for(lambda: done == [2], 5)
        finally:
            await client.close()
            await worker.stop(grace=1)
            await server.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("amqpkit")]
    assert len(errors) == 1 and "refused" in errors[0], errors
    no_secret(caplog.text, str(called), str(enqueued))


async def test_a_service_says_the_login_is_refused_not_that_the_broker_is_unreachable(
    amqp_url: str, vhost: str, user: str, name: str, proxy: FaultProxy
) -> None:
    """/readyz said "not connected to the broker (reconnecting)", and --give-up-after "the broker was unreachable"."""
    service = Service(f"{name}.svc")
    async with service.serve(as_user(amqp_url, vhost, user, via=proxy), grace=1, give_up_after=1.5) as running:
        assert running.readiness() == (True, None)
        await refuse("permission", vhost, user, proxy)
        await wait_for(lambda: running.broker.access_refused is not None, 5)
        ready, why = running.readiness()
        assert not ready and f"access to vhost '{vhost}' refused" in (why or ""), why
        failed = await asyncio.wait_for(running.wait_failed(), 10)
        assert f"access to vhost '{vhost}' refused" in failed and "unreachable" not in failed, failed
