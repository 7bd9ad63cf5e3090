"""What a pattern stops using, the Broker forgets: a reconnect does not bring it back; and what a
pattern can no longer use after a reconnect, it reports (issue 10).

Only this test's own connection is cut, through the fault proxy; the checks and the changes made
under the client are made from another connection (the ``broker`` fixture), which the cut does not touch.
"""

from __future__ import annotations

import asyncio

import pytest

from amqpkit import (
    Broker,
    BrokerSettings,
    Envelope,
    Exchange,
    NoResponder,
    Queue,
    RpcClient,
    RpcServer,
    Subscriber,
    TopologyError,
    Unroutable,
)

from ..waiting import wait_for
from .proxy import FaultProxy, hold_out, let_in


async def _cut_and_wait_for_the_reconnect(proxy: FaultProxy, b: Broker) -> None:
    generation = b.generation
    proxy.cut()
    await wait_for(lambda: b.generation > generation and b.is_connected, 30)


async def _nothing(_: object) -> None:
    return None


async def test_a_stopped_private_subscription_is_not_declared_again(
    proxied: BrokerSettings, proxy: FaultProxy, broker: Broker, name: str, cleanup: list[str]
) -> None:
    exchange = Exchange(f"{name}.x", type="fanout", durable=False)
    cleanup.append(f"x:{exchange.name}")
    async with Broker(proxied) as b:
        sub: Subscriber[object] = Subscriber(b, exchange, _nothing)
        async with sub:
            private_name = sub.queue_name
            await broker.publish(Envelope(b"while subscribed"), exchange=exchange, mandatory=True)
        assert not b.remembers(sub.queue)
        assert not any(b.remembers(binding) for binding in sub.bindings)
        # The exclusive auto-delete queue went with its consumer.
        with pytest.raises(TopologyError, match="NOT_FOUND"):
            await broker.queue_counts(private_name)

        await _cut_and_wait_for_the_reconnect(proxy, b)
        # Nothing was declared and bound again: no queue takes what is published to the exchange.
        with pytest.raises(Unroutable):
            await broker.publish(Envelope(b"after the reconnect"), exchange=exchange, mandatory=True)

        # The same Subscriber can start again: it declares afresh.
        async with sub:
            assert b.remembers(sub.queue)
            await broker.publish(Envelope(b"subscribed again"), exchange=exchange, mandatory=True)


async def test_a_stopped_shared_subscription_keeps_its_queue(
    proxied: BrokerSettings, proxy: FaultProxy, broker: Broker, name: str, cleanup: list[str]
) -> None:
    exchange = Exchange(f"{name}.x", type="direct", durable=False)
    shared = f"{name}.shared"
    cleanup += [f"q:{shared}", f"x:{exchange.name}"]
    async with Broker(proxied) as b:
        sub: Subscriber[object] = Subscriber(b, exchange, _nothing, binding_keys=["k"], queue=shared)
        async with sub:
            pass
        # The Broker no longer re-binds it after a reconnect ...
        assert not any(b.remembers(binding) for binding in sub.bindings)
        await _cut_and_wait_for_the_reconnect(proxy, b)
        # ... but the queue and its binding stay on the broker: messages wait for the next start.
        await broker.publish(Envelope(b"kept"), exchange=exchange, routing_key="k", mandatory=True)
        assert (await broker.queue_counts(shared))[0] == 1


async def test_a_subscriber_sharing_the_queue_keeps_it_remembered(
    proxied: BrokerSettings, name: str, cleanup: list[str]
) -> None:
    """Two subscribers of one shared queue on one Broker: stopping one forgets nothing the other needs."""
    exchange = Exchange(f"{name}.x", type="direct", durable=False)
    shared = f"{name}.shared"
    cleanup += [f"q:{shared}", f"x:{exchange.name}"]
    async with Broker(proxied) as b:
        first: Subscriber[object] = Subscriber(b, exchange, _nothing, binding_keys=["k"], queue=shared)
        second: Subscriber[object] = Subscriber(b, exchange, _nothing, binding_keys=["k"], queue=shared)
        async with second:
            async with first:
                pass
            assert all(b.remembers(binding) for binding in second.bindings)
        assert not any(b.remembers(binding) for binding in second.bindings)


async def test_a_closed_rpc_client_forgets_its_reply_queue(proxied: BrokerSettings, proxy: FaultProxy) -> None:
    async with Broker(proxied) as b:
        client = RpcClient(b, "nobody-serves-this", reply_queue="exclusive")
        async with client:
            spec = client._reply_spec
            assert spec is not None and b.remembers(spec)
        assert not b.remembers(spec)
        await _cut_and_wait_for_the_reconnect(proxy, b)
        assert not b.remembers(spec)
        # Starting again makes a new reply queue.
        async with client:
            assert client._reply_spec is not None and b.remembers(client._reply_spec)


async def test_a_stopped_rpc_server_leaves_no_queue_to_collect_requests(
    proxied: BrokerSettings, proxy: FaultProxy, broker: Broker, name: str, cleanup: list[str]
) -> None:
    """A request to a server that stopped must fail with NoResponder, not wait in a queue nobody reads."""
    cleanup.append(f"q:{name}")
    async with Broker(proxied) as b:
        server = RpcServer(b, Queue(name, auto_delete=True), handlers={"echo": _echo})
        async with server:
            pass
        assert not b.remembers(server.queue)
        await _cut_and_wait_for_the_reconnect(proxy, b)
        async with RpcClient(broker, name, timeout=10) as client:
            with pytest.raises(NoResponder):
                await client.call("echo", "hello")


async def _echo(text: str) -> str:
    return text


# ------------------------------------------------- a queue that cannot come back is reported


async def test_an_rpc_server_whose_queue_was_redeclared_under_it_reports_it(
    proxied: BrokerSettings, proxy: FaultProxy, broker: Broker, name: str, cleanup: list[str]
) -> None:
    queue = Queue(f"{name}.rpc")
    cleanup.append(f"q:{queue.name}")
    errors: list[BaseException] = []
    async with Broker(proxied) as b:
        server = RpcServer(b, queue, handlers={"echo": _echo}, on_error=errors.append)
        async with server:
            async with RpcClient(b, queue.name, timeout=10) as client:
                assert await client.call("echo", "before") == "before"
            await hold_out(proxy, b)
            await broker.delete_queue(queue.name)
            await broker.declare_queue(Queue(queue.name, max_length=5))  # someone else's idea of it
            await let_in(proxy, b)

            await asyncio.wait_for(server.wait_stopped(), 10)
            assert len(errors) == 1
            assert isinstance(errors[0], TopologyError)
            assert server.error is errors[0]
            assert not server.running
        # Stopping a server that already stopped with an error is quiet, and leaves the error readable.
        assert server.error is errors[0]


async def test_a_subscriber_whose_queue_was_redeclared_under_it_raises_from_its_iteration(
    proxied: BrokerSettings, proxy: FaultProxy, broker: Broker, name: str, cleanup: list[str]
) -> None:
    exchange = Exchange(f"{name}.x", type="fanout", durable=False)
    shared = f"{name}.shared"
    cleanup += [f"q:{shared}", f"x:{exchange.name}"]
    errors: list[BaseException] = []
    async with Broker(proxied) as b:
        sub: Subscriber[object] = Subscriber(b, exchange, queue=shared, on_error=errors.append)
        async with sub:
            got: list[object] = []

            async def iterate() -> None:
                async for delivery in sub:
                    got.append(delivery.value)
                    await delivery.ack()

            reading = asyncio.ensure_future(iterate())
            try:
                await broker.publish(Envelope(b"1", content_type="application/json"), exchange=exchange)
                await wait_for(lambda: got == [1], 10)
                await hold_out(proxy, b)
                await broker.delete_queue(shared)
                await broker.declare_queue(Queue(shared, durable=True, max_length=5))
                await let_in(proxy, b)
                with pytest.raises(TopologyError):
                    await asyncio.wait_for(reading, 10)
            finally:
                reading.cancel()
            assert len(errors) == 1 and sub.error is errors[0]
            await asyncio.wait_for(sub.wait_stopped(), 10)
