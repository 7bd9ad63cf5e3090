"""What an operator changes under a running Broker: permissions, topic permissions, a vhost's queue limit.

Each test has a vhost of its own (limits are per vhost) and a user of its own,
both deleted afterwards; nothing here touches the rest of the node.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import pytest

from amqpkit import (
    Binding,
    Broker,
    BrokerSettings,
    ConnectionLost,
    Consumer,
    Delivery,
    Envelope,
    Exchange,
    PublishError,
    Queue,
    ReconnectPolicy,
    RetryPolicy,
    RpcClient,
    RpcServer,
    Subscriber,
    TopologyError,
    Worker,
    WorkQueue,
)
from amqpkit.patterns.tasks import DEAD_LETTER_REASON
from amqpkit.service import Service

from ..brokerctl import arabbitmqctl, made_user, made_vhost, rabbitmqctl, rabbitmqctl_available, with_vhost
from ..deliveries import acked_bodies
from ..waiting import wait_for
from .proxy import FaultProxy, bounce

pytestmark = pytest.mark.skipif(not rabbitmqctl_available(), reason="needs rabbitmqctl")

PASSWORD = "perm-test-password"
FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.5, jitter=0.05)


@pytest.fixture
def vhost() -> Iterator[str]:
    with made_vhost("amqpkit-perm") as name:
        yield name


@pytest.fixture
def user(vhost: str) -> Iterator[str]:
    with made_user("amqpkit-perm", vhost, PASSWORD) as name:
        yield name


def as_user(amqp_url: str, vhost: str, user: str, **overrides: Any) -> BrokerSettings:
    host = amqp_url.split("@", 1)[1].split("/", 1)[0]
    url = with_vhost(f"amqp://{user}:{PASSWORD}@{host}/", vhost)
    options: dict[str, Any] = {"heartbeat": 5, "reconnect": FAST, "publish_timeout": 5, **overrides}
    return BrokerSettings(url=url, **options)


@contextlib.asynccontextmanager
async def proxied_as_user(
    amqp_url: str, vhost: str, user: str, **overrides: Any
) -> AsyncIterator[tuple[BrokerSettings, FaultProxy]]:
    """Settings of ``user`` on ``vhost`` (see :func:`as_user`) through a fault proxy of their own: (settings, proxy)."""
    settings = as_user(amqp_url, vhost, user, **overrides)
    host, port = settings.urls[0].split("@", 1)[1].split("/", 1)[0].split(":")
    proxy = await FaultProxy(host, int(port)).start()
    try:
        yield settings.model_copy(update={"urls": (with_vhost(proxy.url(user, PASSWORD), vhost),)}), proxy
    finally:
        await proxy.close()


@contextlib.asynccontextmanager
async def through_proxy(
    amqp_url: str, vhost: str, user: str, **overrides: Any
) -> AsyncIterator[tuple[Broker, FaultProxy]]:
    """A Broker of ``user`` on ``vhost`` through a fault proxy of its own: (broker, proxy)."""
    async with proxied_as_user(amqp_url, vhost, user, **overrides) as (proxied, proxy), Broker(proxied) as broker:
        yield broker, proxy


@contextlib.asynccontextmanager
async def rpc_adder(
    server_broker: Broker, client_broker: Broker, name: str, reply_queue: Literal["direct", "exclusive"]
) -> AsyncIterator[RpcClient]:
    """An RpcServer on ``server_broker`` for ``{name}.rpc`` whose "add" adds 1, started, and an RpcClient of it on
    ``client_broker``: the client, closed and the server stopped at the end."""
    server = RpcServer(server_broker, f"{name}.rpc")

    @server.method("add")
    async def add(n: int) -> int:
        return n + 1

    await server.start()
    client = RpcClient(client_broker, f"{name}.rpc", reply_queue=reply_queue)
    try:
        yield client
    finally:
        await client.close()
        await server.stop()


def lift_limits(vhost: str) -> None:
    """Clear the vhost's limits (rabbitmqctl fails when there are none: that is fine)."""
    with contextlib.suppress(RuntimeError):
        rabbitmqctl("clear_vhost_limits", "-p", vhost)


def queues(vhost: str) -> list[str]:
    return rabbitmqctl("list_queues", "-q", "-p", vhost, "name").split()[1:]  # after the "name" heading


async def test_a_subscriber_whose_binding_is_refused_leaves_no_queue_behind(
    amqp_url: str, vhost: str, user: str, name: str
) -> None:
    """The start raised a clear TopologyError, but its private queue stayed remembered (declared again by every
    reconnect, collecting nothing anyone read): 5 failed starts left 5 queues, in a hunt. The declare was outside
    the part of the start that is undone when it fails."""
    events = Exchange(f"{name}.events", type="topic")
    rabbitmqctl("set_topic_permissions", "-p", vhost, user, events.name, ".*", r"^ok\..*")
    async with Broker(as_user(amqp_url, vhost, user)) as broker:
        await broker.declare_exchange(events)

        async def handler(event: Any) -> None:
            pass

        for _ in range(3):
            subscriber = Subscriber(broker, events, handler, binding_keys=["bad.#"])
            with pytest.raises(TopologyError, match="ACCESS_REFUSED"):
                await subscriber.start()
            assert not broker.remembers(subscriber.queue)
        assert not [q for q in queues(vhost) if q.startswith("amq.gen-")], queues(vhost)
        # A binding the user may make still works on the same Broker.
        allowed = Subscriber(broker, events, handler, binding_keys=["ok.#"])
        await allowed.start()
        await allowed.stop()


async def test_an_exclusive_reply_queue_refused_at_a_reconnect_is_made_again_once_allowed(
    amqp_url: str, vhost: str, user: str, name: str
) -> None:
    """The reconnect could not declare the client's exclusive reply queue again (the vhost's max-queues): every
    call after it failed at once with "used before it was declared", for good, even after the limit was lifted
    (3 of 3 runs, in a hunt). The client now starts again, with a new reply queue, at its next call."""
    slow = ReconnectPolicy(initial_delay=0.5, max_delay=0.5, jitter=0)  # time to call while it is down
    async with (
        Broker(as_user(amqp_url, vhost, user)) as server_broker,
        through_proxy(amqp_url, vhost, user, reconnect=slow) as (client_broker, proxy),
        rpc_adder(server_broker, client_broker, name, "exclusive") as client,
    ):
        try:
            assert await client.call("add", 1, timeout=5) == 2
            rabbitmqctl("set_vhost_limits", "-p", vhost, f'{{"max-queues": {len(queues(vhost)) - 1}}}')
            reconnects = client_broker.reconnects
            lost = asyncio.Event()
            client_broker.on_disconnect(lambda _: lost.set())
            proxy.cut()  # the exclusive reply queue goes with the connection; no room to declare it again
            # Heard through on_disconnect: polling is_connected did not see the Broker disconnected within 5 s in
            # 2 of 3 runs (at eeab449 too, and in a CI run), though its log says it lost the connection and came
            # back; why the poll missed it I did not find.
            await asyncio.wait_for(lost.wait(), 5)
            # Made while it is down, this call waits for the reconnect, which cannot bring its reply queue
            # back: a typed error with the broker's reason (a review: AttributeError).
            with pytest.raises((ConnectionLost, TopologyError), match="queue limit in vhost"):
                await client.call("add", 2, timeout=5)
            await wait_for(lambda: client_broker.reconnects > reconnects, 15)
            with pytest.raises(TopologyError, match="queue limit in vhost"):
                await client.call("add", 2, timeout=5)
            lift_limits(vhost)
            assert await client.call("add", 3, timeout=5) == 4
        finally:
            lift_limits(vhost)


async def test_a_task_whose_delay_queue_is_refused_is_dead_lettered_not_run_again_and_again(
    amqp_url: str, vhost: str, user: str, name: str
) -> None:
    """Requeued because its retry's delay queue could not be declared, a failing task ran again every second,
    beyond its retry policy: 21 runs in 21 s with max_attempts=3, in a hunt. It is now dead-lettered, with the
    reason, to be replayed once the refusal is lifted."""
    runs: list[int] = []
    async with Broker(as_user(amqp_url, vhost, user)) as broker:
        work = WorkQueue(broker, f"{name}.tasks", retry=RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=0))

        async def handler(task: Delivery[Any]) -> None:
            runs.append(1)
            raise RuntimeError("fails")

        worker = Worker(work, handler, concurrency=1)
        await worker.start()
        try:
            rabbitmqctl("set_vhost_limits", "-p", vhost, f'{{"max-queues": {len(queues(vhost))}}}')
            await work.enqueue({"n": 1})
            await wait_for(lambda: worker.dead_lettered == 1, 10)
            await asyncio.sleep(2)  # a requeued task would have run twice more by now
            assert len(runs) == 1
            dead = await broker.get(work.dlq_name)
            assert dead is not None
            assert dead.headers[DEAD_LETTER_REASON] == "retry-refused"
            await dead.ack()
        finally:
            lift_limits(vhost)
            await worker.stop(grace=1)


@pytest.mark.parametrize(
    "pad",
    ["", "k" * 200, "é" * 120],
    ids=["short-keys", "keys-past-the-broker-s-255-byte-reply", "a-reply-cut-within-a-character"],
)
async def test_a_publish_a_topic_permission_refuses_fails_alone_and_at_once(
    amqp_url: str, vhost: str, user: str, name: str, pad: str
) -> None:
    """RabbitMQ closes the publishing channel over the refused publish, and every publish in flight on it fails
    alike: each was counted as refused, and allowed publishes that met three such closes failed with another
    message's error (300 of 1,000 beside 40 refused, in a hunt), while the refused one was sent three times."""
    events = Exchange(f"{name}.events", type="topic")
    sink = Queue(f"{name}.sink", auto_delete=False)
    rabbitmqctl("set_topic_permissions", "-p", vhost, user, events.name, r"^ok\..*", ".*")
    async with Broker(as_user(amqp_url, vhost, user, publish_timeout=20)) as broker:
        await broker.declare(events, sink, Binding(events, sink, routing_key="#"))
        reconnects = broker.reconnects

        async def publish(key: str) -> BaseException | None:
            try:
                await broker.publish(Envelope(key.encode()), exchange=events.name, routing_key=key)
            except Exception as exc:
                return exc
            return None

        # With long keys the broker's reply text is cut within the key (a review: 58 of 960 allowed ones failed
        # again): the refused publish is then counted as any refusal, and others whose keys begin otherwise not.
        # A reply cut within a two-byte character closed the whole connection (a second review: every publish
        # in flight failed with aiormq's untyped InvalidFrameError).
        keys = [(f"bad.{i}." if i % 25 == 0 else f"ok.{i}.") + pad for i in range(1000)]
        outcomes = await asyncio.gather(*(publish(key) for key in keys))
        failed_ok = [(k, o) for k, o in zip(keys, outcomes, strict=True) if k.startswith("ok.") and o is not None]
        assert not failed_ok, f"{len(failed_ok)} allowed publishes failed, e.g. {failed_ok[:2]}"
        # RabbitMQ 4.0 cannot send a reply cut within a character: it closes the whole connection instead (541
        # INTERNAL_ERROR), and the refused publish ends after three such closes, its reason the broker's.
        cut_badly_by_the_broker = pad.isascii() is False and broker.server_version >= (4,)
        for key, outcome in zip(keys, outcomes, strict=True):
            if key.startswith("bad."):
                assert isinstance(outcome, PublishError), (key, outcome)
                expected = "INTERNAL_ERROR" if cut_badly_by_the_broker else f"access to topic '{key[:100]}"
                assert expected in str(outcome)
        if not cut_badly_by_the_broker:
            assert broker.reconnects == reconnects
        ready, _ = await broker.queue_counts(sink.name)
        assert ready >= 960  # every allowed one (a publish sent again after a close may be there twice)
        await broker.delete_queue(sink.name)


@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
async def test_an_rpc_request_the_broker_refuses_fails_with_the_broker_s_reason(
    amqp_url: str, vhost: str, user: str, name: str, reply_queue: Literal["direct", "exclusive"]
) -> None:
    """Over direct reply-to, a refused request closed the reply channel and the call failed as ConnectionLost,
    "the reply channel closed", without the broker's reason (and call_with_retry retried it)."""
    server_settings = BrokerSettings(url=with_vhost(amqp_url, vhost), heartbeat=5, reconnect=FAST)
    # RabbitMQ keeps a channel's granted permissions for that channel's life: narrowed before any channel opens.
    rabbitmqctl("set_permissions", "-p", vhost, user, ".*", "^$", ".*")  # may write nowhere
    async with (
        Broker(server_settings) as server_broker,
        Broker(as_user(amqp_url, vhost, user)) as client_broker,
        rpc_adder(server_broker, client_broker, name, reply_queue) as client,
    ):
        for _ in range(2):
            # 3.10 says "access to", 4.x "write access to"
            with pytest.raises(PublishError, match=r"ACCESS_REFUSED - (write )?access to exchange 'amq\.default'"):
                await client.call("add", 2, timeout=5)
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        assert await client.call("add", 3, timeout=5) == 4


async def test_consumers_come_back_when_their_vhost_is_deleted_and_made_again(
    amqp_url: str, vhost: str, user: str, name: str
) -> None:
    """RabbitMQ deleting a vhost cancels its consumers (basic.cancel) before it closes their connections, and
    refuses access meanwhile: the re-attach each cancel starts declared its queue again on the dying connection,
    got 403 ACCESS_REFUSED, and stopped the consumer for good. A private Subscriber, an RpcServer, a Worker and a
    plain consume() of a durable queue all stopped (4 of 4, 2 runs of 2 in a hunt), and none came back once the
    vhost was made again. A refusal of access is now waited out: each is attached again by the reconnect."""
    events = Exchange(f"{name}.events", type="fanout")
    errors: list[BaseException] = []
    got: dict[str, list[Any]] = {"subscriber": [], "worker": [], "plain": []}

    async def on_event(event: Any) -> None:
        got["subscriber"].append(event)

    async def on_task(task: Any) -> None:
        got["worker"].append(task)

    async def on_plain(delivery: Delivery[bytes]) -> None:
        got["plain"].append(delivery.body)
        await delivery.ack()

    async with Broker(as_user(amqp_url, vhost, user)) as broker:
        subscriber = Subscriber(broker, events, on_event, on_error=errors.append)
        server = RpcServer(broker, f"{name}.rpc", on_error=errors.append)

        @server.method("add")
        async def add(n: int) -> int:
            return n + 1

        work: WorkQueue[Any] = WorkQueue(broker, f"{name}.tasks")
        worker = Worker(work, on_task, on_error=errors.append)
        await subscriber.start()
        await server.start()
        await worker.start()
        plain = await broker.consume(Queue(f"{name}.plain"), on_plain, on_error=errors.append)
        consumers = broker.consumers
        reconnects = broker.reconnects
        try:
            await arabbitmqctl("delete_vhost", vhost)
            await arabbitmqctl("add_vhost", vhost)
            await arabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            await wait_for(lambda: broker.reconnects > reconnects and not broker.detached_consumers(), 30)
            assert errors == []
            assert broker.consumers == consumers and not any(c.cancelled or c.error for c in consumers)
            for queue in (subscriber.queue_name, f"{name}.rpc", f"{name}.tasks", f"{name}.plain"):
                assert (await broker.queue_counts(queue))[1] == 1, queue  # one consumer each, on the new vhost
            async with RpcClient(broker, f"{name}.rpc") as client:
                assert await client.call("add", 1, timeout=5) == 2
            await broker.publish(Envelope(b"{}", content_type="application/json"), exchange=events.name)
            await work.enqueue({"n": 1})
            await broker.publish(Envelope(b"plain"), routing_key=f"{name}.plain")
            await wait_for(lambda: all(got.values()), 10)
        finally:
            await plain.cancel()
            await worker.stop(grace=1)
            await server.stop()
            await subscriber.stop()


async def test_a_consumer_refused_access_at_a_reconnect_waits_and_comes_back_once_allowed(
    amqp_url: str, vhost: str, user: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Rights taken away (configure and read), the connection cut, the rights given back: the reconnect's 403
    ACCESS_REFUSED stopped each consumer for good (on_error, forgotten), so giving the rights back brought
    nothing back. Now a consumer refused access stays registered and not attached (Consumer.error says why),
    is tried again with backoff, logs the refusal once (not once per attempt), and is attached once allowed."""
    import logging

    caplog.set_level(logging.INFO, logger="amqpkit.broker")
    events = Exchange(f"{name}.events", type="fanout")
    errors: list[BaseException] = []
    got: list[Any] = []
    async with through_proxy(amqp_url, vhost, user) as (broker, proxy):

        async def on_event(event: Any) -> None:
            got.append(event)

        async def on_plain(delivery: Delivery[bytes]) -> None:
            got.append(delivery.body)
            await delivery.ack()

        subscriber = Subscriber(broker, events, on_event, on_error=errors.append)  # private: declared again
        await subscriber.start()
        plain = await broker.consume(Queue(f"{name}.plain"), on_plain, on_error=errors.append)
        consumers: list[Consumer] = list(broker.consumers)
        try:
            rabbitmqctl("set_permissions", "-p", vhost, user, "^$", ".*", "^$")  # no configure, no read
            await bounce(proxy, broker)
            await wait_for(lambda: all(c.error is not None for c in consumers), 10)
            await asyncio.sleep(1)  # tried again and again meanwhile (the backoff here: 0.5 s at most)
            assert errors == [] and subscriber.error is None
            for consumer in consumers:
                assert not consumer.cancelled and not consumer.attached.is_set()
                assert isinstance(consumer.error, TopologyError) and "ACCESS_REFUSED" in str(consumer.error)
            assert broker.consumers == tuple(consumers) and len(broker.detached_consumers()) == 2
            refusals = [r for r in caplog.records if "is not attached" in r.getMessage()]
            assert len(refusals) == 2, [r.getMessage() for r in refusals]  # once each, not once per attempt
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            await wait_for(lambda: not broker.detached_consumers(), 10)
            assert all(c.error is None and not c.cancelled for c in consumers)
            await broker.publish(Envelope(b"{}", content_type="application/json"), exchange=events.name)
            await broker.publish(Envelope(b"plain"), routing_key=plain.queue_name)
            await wait_for(lambda: len(got) == 2, 10)
            assert errors == []
        finally:
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            await plain.cancel()
            await subscriber.stop()


async def test_a_service_refused_access_at_a_reconnect_is_not_ready_then_ready_again(
    amqp_url: str, vhost: str, user: str, name: str
) -> None:
    """The same refusal failed the whole service (on_topology_error and on_error: `amqpkit run` exits), though
    an operator may give the rights back a minute later. It now leaves the service running and not ready, its
    readiness naming the refusal, until the rights are back."""
    svc = Service(f"{name}.svc")

    @svc.rpc(f"{name}.rpc")
    async def add(n: int) -> int:
        return n + 1

    async with proxied_as_user(amqp_url, vhost, user) as (proxied, proxy), svc.serve(proxied, grace=1) as running:
        assert running.ready
        try:
            rabbitmqctl("set_permissions", "-p", vhost, user, "^$", ".*", "^$")
            await bounce(proxy, running.broker)
            await wait_for(lambda: "ACCESS_REFUSED" in str(running.readiness()[1]), 10)
            await asyncio.sleep(1)
            ready, reason = running.readiness()
            assert not ready and running.error is None and running.failures == [], reason
            assert reason is not None and f"{name}.rpc" in reason, reason
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            await wait_for(lambda: running.ready, 10)
            async with RpcClient(running.broker, f"{name}.rpc") as client:
                assert await client.call("add", 1, timeout=5) == 2
        finally:
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")


async def test_an_rpc_client_whose_reply_queue_is_refused_access_fails_its_calls_at_once_until_allowed(
    amqp_url: str, vhost: str, user: str, name: str
) -> None:
    """An exclusive reply queue refused access at a reconnect: its consumer waits for access (ab72fda), and calls
    made meanwhile were sent with the old reply queue's name, so each ended only at its timeout (RpcTimeout), its
    reply lost. Each now fails at once with the refusal, and calls work again once the broker allows the queue."""
    server_settings = BrokerSettings(url=with_vhost(amqp_url, vhost), heartbeat=5, reconnect=FAST)
    async with (
        Broker(server_settings) as server_broker,
        through_proxy(amqp_url, vhost, user) as (client_broker, proxy),
        rpc_adder(server_broker, client_broker, name, "exclusive") as client,
    ):
        try:
            assert await client.call("add", 1, timeout=5) == 2
            rabbitmqctl("set_permissions", "-p", vhost, user, "^$", ".*", "^$")  # no configure, no read
            await bounce(proxy, client_broker)
            await wait_for(lambda: client_broker.detached_consumers(), 10)
            loop = asyncio.get_running_loop()
            for _ in range(2):
                started = loop.time()
                with pytest.raises(TopologyError, match="ACCESS_REFUSED"):
                    await client.call("add", 2, timeout=5)
                assert loop.time() - started < 2  # at once, not at its timeout
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            await wait_for(lambda: not client_broker.detached_consumers(), 10)
            assert await client.call("add", 3, timeout=5) == 4
        finally:
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")


@pytest.mark.parametrize("queue_allowed_first", [False, True], ids=["both-refused", "exchange-refused"])
async def test_a_binding_waits_with_its_exchange_refused_access_and_nothing_is_forgotten(
    amqp_url: str, vhost: str, user: str, name: str, queue_allowed_first: bool
) -> None:
    """A review: the Broker's exchange, deleted by someone else while the Broker was away, refused access (403) at
    the reconnect and kept; its binding then met a 404 (no exchange), was forgotten, and stopped its consumer for
    good (exchange refused, queue allowed); or, queue refused as well, the queue was forgotten for its binding's
    404 once it was allowed. Given every right back, the exchange came back without the binding, and an event
    published to it was lost. Now the binding waits with its exchange."""
    from .proxy import hold_out, let_in

    exchange = Exchange(f"{name}.x", type="fanout")
    queue = Queue(f"{name}.q")
    errors: list[BaseException] = []
    got, on_message = acked_bodies()

    async with through_proxy(amqp_url, vhost, user) as (broker, proxy):
        await broker.declare(exchange, queue, Binding(exchange, queue))
        consumer = await broker.consume(queue, on_message, on_error=errors.append)
        try:
            rabbitmqctl("set_permissions", "-p", vhost, user, "^$", ".*", ".*")  # configure nothing
            await hold_out(proxy, broker)
            async with Broker(with_vhost(amqp_url, vhost)) as other:  # someone else deletes the exchange meanwhile
                await other.delete_exchange(exchange.name)
            if queue_allowed_first:
                rabbitmqctl("set_permissions", "-p", vhost, user, f"^{queue.name}$", ".*", ".*")
            await let_in(proxy, broker)
            await wait_for(lambda: consumer.error is not None or consumer.cancelled, 10)
            if not queue_allowed_first:
                await asyncio.sleep(1)  # tried again meanwhile (0.5 s backoff at most)
                rabbitmqctl("set_permissions", "-p", vhost, user, f"^{queue.name}$", ".*", ".*")
            await asyncio.sleep(1.5)  # the queue declared, the exchange still refused
            assert errors == [] and not consumer.cancelled
            assert broker.remembers(queue) and broker.remembers(Binding(exchange, queue))
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            await wait_for(lambda: consumer.attached.is_set() and not broker._access_refused, 10)
            await broker.publish(Envelope(b"event"), exchange=exchange.name)
            await wait_for(lambda: got == [b"event"], 10)
            assert errors == []
        finally:
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            await consumer.cancel()


async def test_a_private_queue_refused_its_binding_is_not_made_again_at_each_attempt(
    amqp_url: str, vhost: str, user: str, name: str
) -> None:
    """A review: a Subscriber's private (server-named) queue whose bind was refused access at a reconnect got a new
    queue at each attempt, 15-16 in 6 s (about 720 an hour at the default backoff), and once allowed the binding
    went to an earlier one, which then took a copy of every event for nobody."""
    events = Exchange(f"{name}.events", type="fanout")
    got: list[Any] = []

    async def on_event(event: Any) -> None:
        got.append(event)

    async with through_proxy(amqp_url, vhost, user) as (broker, proxy):
        subscriber = Subscriber(broker, events, on_event)
        await subscriber.start()
        try:
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", r"^amq\.gen-.*")  # no read on the exchange
            await bounce(proxy, broker)
            await asyncio.sleep(3)  # tried again about 6 times (0.5 s backoff at most)
            assert len(queues(vhost)) == 1, queues(vhost)
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            await wait_for(lambda: not broker.detached_consumers(), 10)
            await broker.publish(Envelope(b"{}", content_type="application/json"), exchange=events.name)
            await wait_for(lambda: len(got) == 1, 10)

            def listed() -> list[list[str]]:
                lines = rabbitmqctl("list_queues", "-q", "-p", vhost, "name", "messages", "consumers").splitlines()
                return [line.split()[1:] for line in lines[1:]]

            # One queue, read, nothing left; the broker counts the ack a moment later (it failed 3 of 4 runs once).
            await wait_for(lambda: listed() == [["0", "1"]], 10)
        finally:
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            await subscriber.stop()


async def test_consumers_of_bound_queues_come_back_when_their_vhost_is_deleted_and_made_again(
    amqp_url: str, vhost: str, user: str, name: str
) -> None:
    """A review: a queue bound to an exchange of the Broker's own, its consumer cancelled as the vhost was deleted:
    the re-attach declared the queue again on the dying connection, then its bind met a 404 (the exchange already
    gone), and stopped the consumer for good (2-3 of 5-6 runs of four such queues). The re-attach now declares the
    exchanges its bindings need first."""
    exchange = Exchange(f"{name}.x", type="fanout")
    bound = [Queue(f"{name}.q{i}") for i in range(4)]
    errors: list[BaseException] = []
    got: list[str] = []

    async with Broker(as_user(amqp_url, vhost, user)) as broker:
        await broker.declare(exchange, *bound, *(Binding(exchange, q) for q in bound))
        consumers = []
        for q in bound:

            async def on_message(delivery: Delivery[bytes], q: Queue = q) -> None:
                got.append(q.name)
                await delivery.ack()

            consumers.append(await broker.consume(q, on_message, on_error=errors.append))
        try:
            for round_ in range(3):
                reconnects = broker.reconnects
                await arabbitmqctl("delete_vhost", vhost)
                await arabbitmqctl("add_vhost", vhost)
                await arabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
                await wait_for(lambda n=reconnects: broker.reconnects > n and not broker.detached_consumers(), 30)  # type: ignore[misc]
                assert errors == [] and not any(c.cancelled for c in consumers), (round_, errors)
            got.clear()
            await broker.publish(Envelope(b"event"), exchange=exchange.name)
            await wait_for(lambda: sorted(got) == sorted(q.name for q in bound), 10)
        finally:
            for consumer in consumers:
                await consumer.cancel()
