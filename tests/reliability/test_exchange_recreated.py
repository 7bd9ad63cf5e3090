"""An exchange a Subscriber reads from, deleted under it by someone else and made again.

Deleting an exchange deletes its bindings. Made again (by an operator, a definitions import, another service's
restart or reconnect), the exchange has none: a Subscriber kept consuming a queue nothing was routed to any more,
and every event published to the exchange reached nobody, without an error, for as long as the process ran.
"""

from __future__ import annotations

import asyncio

import pytest

from amqpkit import Broker, BrokerSettings, Exchange, Publisher, PublishError, Subscriber

from ..waiting import wait_for

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
    broker: Broker, settings: BrokerSettings, name: str, cleanup: list[str], kind: str, shared: bool
) -> None:
    routing_key, keys = KINDS[kind]
    exchange = Exchange(f"{name}.events", type=kind)
    got: list[str] = []

    async def on_event(event: str) -> None:
        got.append(event)

    queue = f"{name}.sub" if shared else None
    if shared:
        cleanup.append(f"q:{name}.sub")
    async with Broker(settings) as operator, Broker(settings) as service:
        ops = await operator.lowlevel.open_channel()
        try:
            async with Subscriber(broker, exchange, on_event, binding_keys=keys, queue=queue):
                publisher = Publisher(service, exchange)  # another service's publisher
                await publisher.publish("before", routing_key=routing_key)
                await wait_for(lambda: got == ["before"])
                # The operator deletes the exchange and makes it again, as it was.
                await ops.exchange_delete(exchange.name)
                await ops.exchange_declare(exchange.name, exchange_type=kind, durable=True)
                made_again = asyncio.get_running_loop().time()
                n = 0
                while not got[1:]:
                    n += 1
                    await publisher.publish(f"probe-{n}", routing_key=routing_key)
                    waited = asyncio.get_running_loop().time() - made_again
                    # before: no event in 20 s (nor ever after, in this process)
                    assert waited < 20, f"no event reached the subscriber in {waited:.1f} s ({n} published)"
                    await asyncio.sleep(0.05)
                for i in range(10):
                    await publisher.publish(f"after-{i}", routing_key=routing_key)
                await wait_for(lambda: all(f"after-{i}" in got for i in range(10)))
        finally:
            await ops.exchange_delete(exchange.name)
            await ops.close()


async def test_an_exchange_deleted_and_not_made_again_comes_back_for_its_subscriber(
    broker: Broker, settings: BrokerSettings, name: str
) -> None:
    """Nobody makes it again: the Subscriber's Broker declared it, and declares it again with its bindings. The
    other service's publishes to it fail (NOT_FOUND) meanwhile, and then reach the subscriber."""
    exchange = Exchange(f"{name}.events", type="fanout")
    got: list[str] = []

    async def on_event(event: str) -> None:
        got.append(event)

    async with Broker(settings) as operator, Broker(settings) as service:
        ops = await operator.lowlevel.open_channel()
        try:
            async with Subscriber(broker, exchange, on_event):
                publisher = Publisher(service, exchange)
                await publisher.publish("before")
                await wait_for(lambda: got == ["before"])
                await ops.exchange_delete(exchange.name)
                deleted = asyncio.get_running_loop().time()
                refused = 0
                while not got[1:]:
                    try:
                        await publisher.publish("probe")
                    except PublishError:
                        refused += 1
                    waited = asyncio.get_running_loop().time() - deleted
                    # before: every publish refused, for as long as the test waited
                    assert waited < 20, f"no event reached the subscriber in {waited:.1f} s ({refused} refused)"
                    await asyncio.sleep(0.05)
        finally:
            await ops.exchange_delete(exchange.name)
            await ops.close()


async def test_a_publish_that_finds_the_exchange_gone_brings_it_back_for_its_own_broker(
    broker: Broker, settings: BrokerSettings, name: str
) -> None:
    """A Publisher and a Subscriber on one Broker: the publish that finds the exchange deleted fails, and the
    Broker declares the exchange and its bindings again at once, so the next publish reaches the subscriber."""
    exchange = Exchange(f"{name}.events", type="fanout")
    got: list[str] = []

    async def on_event(event: str) -> None:
        got.append(event)

    async with Broker(settings) as operator:
        ops = await operator.lowlevel.open_channel()
        try:
            async with Subscriber(broker, exchange, on_event):
                publisher = Publisher(broker, exchange)
                await publisher.publish("before")
                await wait_for(lambda: got == ["before"])
                await ops.exchange_delete(exchange.name)
                deleted = asyncio.get_running_loop().time()
                refused = 0
                while not got[1:]:
                    try:
                        await publisher.publish("probe")
                    except PublishError:
                        refused += 1
                    waited = asyncio.get_running_loop().time() - deleted
                    assert waited < 20, f"no event reached the subscriber in {waited:.1f} s ({refused} refused)"
                    await asyncio.sleep(0.05)
                assert refused >= 1
        finally:
            await ops.exchange_delete(exchange.name)
            await ops.close()
