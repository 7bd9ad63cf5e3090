"""A service runs in-process on one Broker: handlers get their resources, hooks run in order, failures are reported."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel

from amqpkit import Broker, BrokerSettings, Exchange, Publisher, Queue, ReconnectPolicy, RpcClient, Subscriber
from amqpkit.service import PublisherSpec, Service, ServiceContext

from ..reliability.proxy import FaultProxy, proxied_settings
from ..waiting import wait_for


class Order(BaseModel):
    id: int
    total: float


class Shipped(BaseModel):
    id: int
    by: str


class Store:
    """Stands in for a database pool: made at startup, closed at shutdown."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.orders: dict[int, Order] = {}
        self.closed = False


def build(name: str, events: list[str]) -> tuple[Service, Exchange, Exchange]:
    svc = Service(f"{name}.svc")
    orders = Exchange(f"{name}.orders", type="topic")
    shipping = Exchange(f"{name}.shipping", type="fanout")
    shipped: PublisherSpec[Shipped] = svc.publisher(shipping, Shipped)

    @svc.resource
    async def store(ctx: ServiceContext) -> AsyncIterator[Store]:
        events.append("store opened")
        s = Store(events)
        yield s
        s.closed = True
        events.append("store closed")

    @svc.on_startup
    async def started(ctx: ServiceContext) -> None:
        ctx.state["carrier"] = "ACME"
        events.append(f"startup sees the store: {isinstance(ctx.get(Store), Store)}")

    @svc.on_shutdown
    def stopped() -> None:
        events.append("shutdown")

    @svc.subscriber(orders, binding_keys=["order.placed"], queue=f"{name}.orders")
    async def on_order(order: Order, ctx: ServiceContext) -> None:
        await ctx.work_queue(f"{name}.ship").enqueue(order)

    @svc.worker(f"{name}.ship", concurrency=2)
    def ship(order: Order, store: Store, ctx: ServiceContext) -> None:  # a plain def: runs in a thread
        assert threading.current_thread() is not threading.main_thread()
        store.orders[order.id] = order
        publish = ctx.publisher(shipped).publish(Shipped(id=order.id, by=ctx.state["carrier"]))
        asyncio.run_coroutine_threadsafe(publish, loop).result(timeout=30)

    @svc.rpc(f"{name}.rpc")
    async def total(order_id: int, store: Store) -> float | None:
        found = store.orders.get(order_id)
        return found.total if found else None

    loop = asyncio.get_running_loop()
    return svc, orders, shipping


async def drop(broker: Broker, name: str) -> None:
    for q in (f"{name}.orders", f"{name}.ship", f"{name}.ship.dlq", f"{name}.rpc"):
        await broker.delete_queue(q)
    for x in (f"{name}.orders", f"{name}.shipping"):
        await broker.delete_exchange(x)


async def test_a_service_runs_its_handlers_with_their_resources(
    settings: BrokerSettings, broker: Broker, name: str
) -> None:
    events: list[str] = []
    svc, orders, shipping = build(name, events)
    got: asyncio.Queue[Shipped] = asyncio.Queue()

    async def on_shipped(s: Shipped) -> None:
        await got.put(s)

    try:
        async with svc.serve(settings) as running:
            assert running.readiness() == (True, None)
            assert events == ["store opened", "startup sees the store: True"]
            async with Subscriber(broker, shipping, on_shipped), RpcClient(broker, f"{name}.rpc") as rpc:
                await Publisher(broker, orders).publish(Order(id=7, total=9.5), routing_key="order.placed")
                shipped = await asyncio.wait_for(got.get(), 30)
                assert shipped == Shipped(id=7, by="ACME")
                assert await rpc.call("total", 7, timeout=10) == 9.5
                assert await rpc.call("total", 8, timeout=10) is None
            store = running.context.get(Store)
        assert running.readiness() == (False, "stopping")
        assert store.closed
        assert events[2:] == ["shutdown", "store closed"]  # hooks after the handlers stopped, resources last
    finally:
        await drop(broker, name)


@pytest.fixture
def proxied(proxy: FaultProxy, amqp_url: str) -> BrokerSettings:
    return proxied_settings(proxy, amqp_url, reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=0.5, jitter=0.05))


async def test_readiness_follows_the_connection(
    proxied: BrokerSettings, proxy: FaultProxy, broker: Broker, name: str
) -> None:
    svc, _, _ = build(name, [])
    try:
        async with svc.serve(proxied) as running:
            assert running.ready
            proxy.refusing = True
            proxy.cut()
            await wait_for(lambda: not running.ready, timeout=15)
            _, reason = running.readiness()
            assert reason is not None and "not connected" in reason
            proxy.refusing = False
            await wait_for(lambda: running.ready, timeout=30)
            async with RpcClient(broker, f"{name}.rpc") as rpc:  # every consumer is back
                assert await rpc.call("total", 1, timeout=10) is None
            assert running.error is None
    finally:
        await drop(broker, name)


async def test_a_consumer_that_cannot_be_restored_fails_the_service(
    proxied: BrokerSettings, proxy: FaultProxy, broker: Broker, name: str
) -> None:
    svc, _, _ = build(name, [])
    try:
        async with svc.serve(proxied, grace=1) as running:
            proxy.stall()  # the service hears of the deletion only once the other queue is in place
            await broker.delete_queue(f"{name}.ship")
            await broker.declare_queue(Queue(f"{name}.ship", durable=True))  # classic, where the worker wants quorum
            proxy.cut()
            reason = await asyncio.wait_for(running.wait_failed(), 60)
            assert f"{name}.ship" in reason and "PRECONDITION_FAILED" in reason, reason
            assert running.readiness() == (False, reason)
            assert [who for who, _ in running.failures] == [f"worker {svc.handlers[1].name}"]
    finally:
        await drop(broker, name)


async def test_a_broker_away_past_give_up_after_fails_the_service(
    proxied: BrokerSettings, proxy: FaultProxy, broker: Broker, name: str
) -> None:
    svc, _, _ = build(name, [])
    try:
        async with svc.serve(proxied, grace=1, give_up_after=2) as running:
            proxy.refusing = True
            proxy.cut()
            reason = await asyncio.wait_for(running.wait_failed(), 30)
            assert "unreachable for 2 s" in reason, reason
    finally:
        await drop(broker, name)
