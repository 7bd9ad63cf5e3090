"""An exchange a Subscriber reads from, deleted under it by someone else and made again.

Deleting an exchange deletes its bindings. Made again (by an operator, a definitions import, another service's
restart or reconnect), the exchange has none: a Subscriber kept consuming a queue nothing was routed to any more,
and every event published to the exchange reached nobody, without an error, for as long as the process ran (each
of these tests failed before, on 3.10 and 4.0: nothing in 20 s). Now the Broker binds the queues it consumes again
every ``binding_check_interval`` seconds (0.5 s here, 30 s by default), declaring first an exchange of its own that
is gone.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from amqpkit import (
    Broker,
    BrokerSettings,
    Envelope,
    Exchange,
    ExchangeType,
    Publisher,
    PublishError,
    Subscriber,
    TopologyError,
)

from ..brokerctl import arabbitmqctl, as_user, close_connections, own_user, vhost_of
from ..waiting import wait_for

CHECK = 0.5  # binding_check_interval in these tests


def checking(settings: BrokerSettings, interval: float = CHECK) -> BrokerSettings:
    return settings.model_copy(update={"binding_check_interval": interval})


async def probe_until_delivered(
    publisher: Publisher[str], got: list[str], routing_key: str = ""
) -> tuple[float, int, int]:
    """Publish a probe every 50 ms, from now, until the subscriber has an event past its first: (seconds it took,
    probes published, of which refused with PublishError). AssertionError if none arrives in 20 s."""
    loop = asyncio.get_running_loop()
    since = loop.time()
    published = refused = 0
    while not got[1:]:
        published += 1
        try:
            await publisher.publish(f"probe-{published}", routing_key=routing_key)
        except PublishError:
            refused += 1
        waited = loop.time() - since
        assert waited < 20, f"no event reached the subscriber in {waited:.1f} s ({published} sent, {refused} refused)"
        await asyncio.sleep(0.05)
    return loop.time() - since, published, refused


# Fanout, direct and topic subscriptions (routing, amqpkit/patterns/routing.py, is a Subscriber on a direct or
# topic exchange): the routing key each one's events go with, and the binding key it subscribes with.
KINDS = {
    "fanout": ("", ["x"]),
    "direct": ("orders.eu", ["orders.eu"]),
    "topic": ("orders.eu.created", ["orders.*.created"]),
}


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_subscriber_gets_events_again_once_its_exchange_is_made_again(
    settings: BrokerSettings,
    name: str,
    cleanup: list[str],
    kind: str,
    shared: bool,
    report: dict[str, dict[str, object]],
) -> None:
    routing_key, keys = KINDS[kind]
    exchange = Exchange(f"{name}.events", type=ExchangeType(kind))
    got: list[str] = []

    async def on_event(event: str) -> None:
        got.append(event)

    queue = f"{name}.sub" if shared else None
    if shared:
        cleanup.append(f"q:{name}.sub")
    async with Broker(settings) as operator, Broker(settings) as service, Broker(checking(settings)) as broker:
        ops = await operator.lowlevel.open_channel()
        try:
            async with Subscriber(broker, exchange, on_event, binding_keys=keys, queue=queue):
                publisher = Publisher(service, exchange)  # another service's publisher
                await publisher.publish("before", routing_key=routing_key)
                await wait_for(lambda: got == ["before"])
                # The operator deletes the exchange and makes it again, as it was.
                await ops.exchange_delete(exchange.name)
                await ops.exchange_declare(exchange.name, exchange_type=kind, durable=True)
                # before: no event in 20 s (nor ever after, in this process)
                back, n, refused = await probe_until_delivered(publisher, got, routing_key)
                assert refused == 0  # the exchange is there all along: every probe is taken
                for i in range(10):
                    await publisher.publish(f"after-{i}", routing_key=routing_key)
                await wait_for(lambda: all(f"after-{i}" in got for i in range(10)))
                assert back < 3 * CHECK + 1, back
                report[f"exchange_made_again_{kind}_{'shared' if shared else 'private'}"] = {
                    "binding_check_interval_s": CHECK, "events_again_after_s": round(back, 2), "probes_lost": n - 1,
                    "broker": ".".join(map(str, broker.server_version)),
                }  # fmt: skip
        finally:
            await ops.exchange_delete(exchange.name)
            await ops.close()


async def test_an_exchange_deleted_and_not_made_again_comes_back_for_its_subscriber(
    settings: BrokerSettings, name: str, caplog: pytest.LogCaptureFixture, report: dict[str, dict[str, object]]
) -> None:
    """Nobody makes it again: the Subscriber's Broker declared it, and declares it again with its bindings. The
    other service's publishes to it fail (NOT_FOUND) meanwhile, and then reach the subscriber."""
    exchange = Exchange(f"{name}.events", type="fanout")
    got: list[str] = []

    async def on_event(event: str) -> None:
        got.append(event)

    caplog.set_level(logging.INFO, logger="amqpkit.broker")
    async with Broker(settings) as operator, Broker(settings) as service, Broker(checking(settings)) as broker:
        ops = await operator.lowlevel.open_channel()
        try:
            async with Subscriber(broker, exchange, on_event):
                publisher = Publisher(service, exchange)
                await publisher.publish("before")
                await wait_for(lambda: got == ["before"])
                await ops.exchange_delete(exchange.name)
                # before: every publish refused, for as long as the test waited
                waited, _, refused = await probe_until_delivered(publisher, got)
                assert waited < 3 * CHECK + 1, waited
                await asyncio.sleep(4 * CHECK)  # more rounds: said once
                said = [r for r in caplog.records if exchange.name in r.getMessage()]
                assert [r.levelno for r in said] == [logging.WARNING], [r.getMessage() for r in said]
                assert "declared again" in said[0].getMessage()
                report["exchange_deleted_not_made_again"] = {
                    "binding_check_interval_s": CHECK, "events_again_after_s": round(waited, 2),
                    "publishes_refused_meanwhile": refused, "broker": ".".join(map(str, broker.server_version)),
                }  # fmt: skip
        finally:
            await ops.exchange_delete(exchange.name)
            await ops.close()


async def test_a_publish_that_finds_the_exchange_gone_brings_it_back_for_its_own_broker(
    settings: BrokerSettings, name: str, report: dict[str, dict[str, object]]
) -> None:
    """A Publisher and a Subscriber on one Broker: the publish that finds the exchange deleted fails, and the
    Broker declares the exchange and its bindings again at once (not at its period, a minute here), so a publish
    a second later reaches the subscriber."""
    exchange = Exchange(f"{name}.events", type="fanout")
    got: list[str] = []

    async def on_event(event: str) -> None:
        got.append(event)

    async with Broker(settings) as operator, Broker(checking(settings, 60)) as broker:
        ops = await operator.lowlevel.open_channel()
        try:
            async with Subscriber(broker, exchange, on_event):
                publisher = Publisher(broker, exchange)
                await publisher.publish("before")
                await wait_for(lambda: got == ["before"])
                await ops.exchange_delete(exchange.name)
                waited, _, refused = await probe_until_delivered(publisher, got)
                assert refused >= 1
                assert waited < 3, waited
                report["exchange_deleted_publish_on_same_broker"] = {
                    "binding_check_interval_s": 60, "events_again_after_s": round(waited, 2),
                    "publishes_refused_meanwhile": refused, "broker": ".".join(map(str, broker.server_version)),
                }  # fmt: skip
        finally:
            await ops.exchange_delete(exchange.name)
            await ops.close()


async def test_a_broker_that_only_publishes_does_not_make_the_exchange_again(
    settings: BrokerSettings, name: str
) -> None:
    """Made again with no binding, an exchange would take every publish and route it nowhere: a Broker that binds no
    queue it consumes to it leaves it gone, and its publishes fail loudly (NOT_FOUND) until someone makes it."""
    exchange = Exchange(f"{name}.events", type="fanout")
    async with Broker(settings) as operator, Broker(checking(settings)) as service:
        ops = await operator.lowlevel.open_channel()
        try:
            publisher = Publisher(service, exchange)
            await publisher.publish("before")
            await ops.exchange_delete(exchange.name)
            for _ in range(10):
                with pytest.raises(PublishError, match="no exchange"):
                    await publisher.publish("refused")
                await asyncio.sleep(4 * CHECK / 10)
            with pytest.raises(Exception, match="NOT_FOUND"):
                await ops.exchange_declare(exchange.name, passive=True)
        finally:
            ops = await operator.lowlevel.open_channel()
            await ops.exchange_delete(exchange.name)
            await ops.close()


async def test_a_subscription_stopped_is_not_bound_again(
    settings: BrokerSettings, name: str, cleanup: list[str]
) -> None:
    """A shared subscription stopped keeps its queue and binding on the broker, but the keeper no longer binds it:
    an exchange deleted after the stop is not made again for it."""
    exchange = Exchange(f"{name}.events", type="fanout")
    cleanup.append(f"q:{name}.sub")

    async def on_event(event: str) -> None:
        return None

    async with Broker(settings) as operator, Broker(checking(settings)) as broker:
        ops = await operator.lowlevel.open_channel()
        try:
            async with Subscriber(broker, exchange, on_event, queue=f"{name}.sub"):
                pass
            await ops.exchange_delete(exchange.name)
            await asyncio.sleep(4 * CHECK)
            with pytest.raises(Exception, match="NOT_FOUND"):
                await ops.exchange_declare(exchange.name, passive=True)
        finally:
            ops = await operator.lowlevel.open_channel()
            await ops.exchange_delete(exchange.name)
            await ops.close()


async def test_an_exchange_this_broker_may_not_make_again_is_said_gone_once_and_back_once(
    settings: BrokerSettings, amqp_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The Broker's user may no longer configure the exchange (so cannot declare it again): one WARNING that the
    queue receives nothing from it, however many rounds; once someone else makes it again, one INFO that it is
    bound again, and events arrive."""
    exchange = Exchange(f"{name}.events", type="fanout")
    got: list[str] = []

    async def on_event(event: str) -> None:
        got.append(event)

    caplog.set_level(logging.INFO, logger="amqpkit.broker")
    vhost = vhost_of(amqp_url)
    password = "exchange-gone-pw"
    with own_user(amqp_url, "exchange-gone", password) as user:
        mine = checking(settings).model_copy(update={"urls": (as_user(amqp_url, user, password),)})
        async with Broker(settings) as operator, Broker(mine) as broker:
            ops = await operator.lowlevel.open_channel()
            try:
                async with Subscriber(broker, exchange, on_event):
                    # its own server-named queues still, not the exchange
                    await arabbitmqctl("set_permissions", "-p", vhost, user, "^amq\\.gen-.*", ".*", ".*")
                    await ops.exchange_delete(exchange.name)
                    await asyncio.sleep(6 * CHECK)
                    gone = [r for r in caplog.records if exchange.name in r.getMessage()]
                    assert [r.levelno for r in gone] == [logging.WARNING], [r.getMessage() for r in gone]
                    assert "receives nothing from it until it is back" in gone[0].getMessage()
                    await ops.exchange_declare(exchange.name, exchange_type="fanout", durable=True)
                    made_again = asyncio.get_running_loop().time()
                    while not got:
                        await operator.publish(Envelope(b'"probe"', content_type="application/json"),
                                               exchange=exchange.name)  # fmt: skip
                        assert asyncio.get_running_loop().time() - made_again < 3 * CHECK + 1
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(3 * CHECK)
                    said = [r for r in caplog.records if exchange.name in r.getMessage()]
                    assert [r.levelno for r in said] == [logging.WARNING, logging.INFO], [r.getMessage() for r in said]
                    assert "bound to it again" in said[1].getMessage()
            finally:
                ops = await operator.lowlevel.open_channel()
                await ops.exchange_delete(exchange.name)
                await ops.close()


async def test_a_binding_unbound_while_a_round_waits_is_not_bound_again(settings: BrokerSettings, name: str) -> None:
    """The keeper looked at the Broker's bindings before it waited for the topology channel; an ``unbind()`` that
    held the channel meanwhile (its queue.unbind sent, the binding forgotten after) was undone by the bind that
    followed, and the queue got that routing key again for good, the Broker no longer knowing it (a review).
    Played here in that order: a round asked for while the channel is held, the unbind done under it."""
    exchange = Exchange(f"{name}.events", type=ExchangeType.DIRECT)
    got: list[str] = []

    async def on_event(event: str) -> None:
        got.append(event)

    async with Broker(checking(settings, 3600)) as broker:
        subscriber = Subscriber(broker, exchange, on_event, binding_keys=["a", "b"])
        try:
            async with subscriber:
                gone = subscriber.bindings[0]  # the first the round binds: it waits for the channel with it
                async with broker._topology() as channel:  # what unbind() holds while it unbinds
                    broker._rebind_wanted.set()  # a round now: it waits for the channel
                    await asyncio.sleep(0.3)
                    await channel.queue_unbind(broker.queue_name(gone.queue), exchange.name, routing_key="a")
                    broker._bindings.pop(gone, None)  # as unbind() does, once its queue.unbind is done
                await asyncio.sleep(0.5)  # the round's binds
                publisher: Publisher[str] = Publisher(broker, exchange)
                await publisher.publish("to a", routing_key="a")
                await publisher.publish("to b", routing_key="b")
                await wait_for(lambda: "to b" in got, 10)
                assert got == ["to b"], got  # before: ["to a", "to b"], "a" bound again
        finally:
            await broker.delete_exchange(exchange.name)


@pytest.mark.parametrize("how", ["kept", pytest.param("reconnect", marks=pytest.mark.whole_broker(vhost_only=True))])
@pytest.mark.parametrize("other", ["direct", "fanout"])
async def test_an_exchange_made_again_as_another_type_stops_its_subscriber(
    settings: BrokerSettings, amqp_url: str, name: str, other: str, how: str
) -> None:
    """Someone deletes the subscription's topic exchange and declares it again as a direct (or fanout) one: the
    subscription cannot get what it asked for there, so it stops, with the error for its ``on_error``, as one whose
    queue is made again otherwise does. Before (a hunt, 3.10.8 and 4.0.5), its ``orders.*.created`` binding was
    made again on the new exchange, by the keeper (``kept``) and at a reconnect: 0 of 10 events reached it from a
    direct exchange, and from a fanout one it got every event, whatever its key, and nothing said so."""
    exchange = Exchange(f"{name}.events", type=ExchangeType.TOPIC)
    errors: list[BaseException] = []
    got: list[str] = []

    async def on_event(event: str) -> None:
        got.append(event)

    # kept: the keeper's round finds it; reconnect: a round would come only after the test's timeout
    interval = CHECK if how == "kept" else 3600
    async with Broker(settings) as operator, Broker(checking(settings, interval)) as broker:
        ops = await operator.lowlevel.open_channel()
        try:
            sub = Subscriber(broker, exchange, on_event, binding_keys=["orders.*.created"], on_error=errors.append)
            async with sub:
                generation = broker.generation
                await ops.exchange_delete(exchange.name)
                await ops.exchange_declare(exchange.name, exchange_type=other, durable=True)
                if how == "reconnect":
                    await close_connections(amqp_url, "exchange made again as another type")
                    await wait_for(lambda: broker.generation > generation and broker.is_connected)
                await wait_for(lambda: errors, timeout=10)  # before: none, ever
                assert sub.error is errors[0]
                assert isinstance(errors[0], TopologyError) and f"current is '{other}'" in str(errors[0]), errors
                await sub.wait_stopped()
                # Stopped on the broker too: not bound, not consuming (a first version stopped it only here, and
                # it went on taking what the new exchange routed to it).
                publisher = Publisher(operator, Exchange(exchange.name, type=ExchangeType(other)))
                for key in ("orders.*.created", "orders.eu.created"):  # the binding key, as a direct one routes it
                    await publisher.publish("after", routing_key=key)
                await asyncio.sleep(1)
                assert got == []
        finally:
            await operator.delete_exchange(exchange.name)  # its channel, ops, went with the connection on a reconnect
