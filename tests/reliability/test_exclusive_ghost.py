"""A named exclusive queue across a link that stalls: the Broker notices first (heartbeat + 1 s; the broker
waits for two heartbeats) and reconnects while the broker still holds the old connection, and with it the
exclusive queue. The re-declare meets 405 RESOURCE_LOCKED from the Broker's own old connection; the queue was
forgotten and its consumer stopped for good (``on_error``), though the broker drops the old connection, and the
queue with it, seconds later. Measured on RabbitMQ 4.0.5 and 3.10.8 (a proxy that stops forwarding, and one
that resets the client's side only): stopped 0.01 s after the reconnect, never back. An exclusive consumer of a
durable queue in the same case (403 'in exclusive use') waits, and is back once the old connection is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

import pytest

from amqpkit import Broker, BrokerSettings, Delivery, Envelope, Exchange, Queue, RpcClient, TopologyError
from amqpkit.service import Service

from ..waiting import until, wait_for
from .proxy import FaultProxy, hold_out, let_in, proxied_settings


async def test_a_named_exclusive_queue_comes_back_after_a_stalled_link(
    broker: Broker, proxy: FaultProxy, amqp_url: str, name: str
) -> None:
    queue = Queue(f"{name}.mine", exclusive=True, durable=False)
    got: list[bytes] = []
    errors: list[BaseException] = []

    async def take(delivery: Delivery[bytes]) -> None:
        got.append(delivery.body)
        await delivery.ack()

    async with Broker(proxied_settings(proxy, amqp_url)) as owner:
        consumer = await owner.consume(queue, take, on_error=errors.append)
        proxy.stall()
        await wait_for(lambda: not consumer.attached.is_set(), timeout=10)
        proxy.resume()
        # back once the broker has dropped the old connection (two 2 s heartbeats, and some)
        await wait_for(lambda: consumer.attached.is_set() or bool(errors), timeout=30)
        assert not errors, errors  # before: RESOURCE_LOCKED, the consumer stopped for good
        await wait_for(lambda: consumer.attached.is_set(), timeout=30)
        await broker.publish(Envelope(b"after"), routing_key=queue.name, mandatory=True)
        await wait_for(lambda: got == [b"after"])
    with contextlib.suppress(Exception):
        await broker.delete_queue(queue.name)


async def test_a_named_exclusive_queue_the_old_connection_holds_is_waited_out_and_said_once(
    broker: Broker, proxy: FaultProxy, amqp_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, made certain: the link dies on the client's side only (the broker's side stays open and silent),
    so the Broker reconnects at once and its re-declare surely meets the old connection's 405. The consumer waits,
    registered, not attached, not cancelled, ``error`` naming the lock, no ``on_error``; said once (INFO), not at
    each of the attempts meanwhile, and no WARNING; attached once the broker drops the old connection (within
    three 2 s heartbeats of the reconnect)."""
    caplog.set_level(logging.INFO, logger="amqpkit.broker")
    queue = Queue(f"{name}.mine", exclusive=True, durable=False)
    got: list[bytes] = []
    errors: list[BaseException] = []

    async def take(delivery: Delivery[bytes]) -> None:
        got.append(delivery.body)
        await delivery.ack()

    def said(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "amqpkit.broker" and r.levelno == level]

    async with Broker(proxied_settings(proxy, amqp_url)) as owner:
        consumer = await owner.consume(queue, take, on_error=errors.append)
        assert proxy.abandon() == 1
        await wait_for(lambda: owner.reconnects == 1, timeout=10)
        loop = asyncio.get_running_loop()
        reconnected = loop.time()
        assert not consumer.attached.is_set() and not consumer.cancelled and not errors
        assert "RESOURCE_LOCKED" in str(consumer.error) and owner.consumers == (consumer,)
        assert owner.detached_consumers() == [queue.name]
        await wait_for(lambda: consumer.attached.is_set() or bool(errors), timeout=15)
        took = loop.time() - reconnected
        assert not errors and consumer.error is None and not consumer.cancelled, errors
        await broker.publish(Envelope(b"after"), routing_key=queue.name, mandatory=True)
        await wait_for(lambda: got == [b"after"])
        locked = [line for line in said(logging.INFO) if "another connection holds it" in line]
        assert len(locked) == 1 and queue.name in locked[0], locked
        assert [line for line in said(logging.WARNING) if "lost" not in line] == [], said(logging.WARNING)
        assert said(logging.ERROR) == [] and owner.reconnects == 1
    print(f"attached {took:.2f} s after the reconnect")
    with contextlib.suppress(Exception):
        await broker.delete_queue(queue.name)


async def test_a_named_exclusive_queue_another_live_connection_holds_waits_and_says_so(
    broker: Broker,
    proxy: FaultProxy,
    amqp_url: str,
    settings: BrokerSettings,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same 405, from a live connection that took the queues while the service's was down: the service's
    subscription and RPC server (each on a named exclusive queue of its own) wait, not attached and not stopped,
    the service not ready and not failed, said once when it starts (INFO) and once more (WARNING) when it lasts
    past three heartbeats and 10 s, though the queues are declared again every second meanwhile. Once that
    connection goes they are back. A first consume() of a queue the other connection holds fails at once."""
    caplog.set_level(logging.DEBUG, logger="amqpkit.broker")
    events = Exchange(f"{name}.events", type="direct")
    sub_queue = Queue(f"{name}.sub", exclusive=True, durable=False)
    rpc_queue = Queue(f"{name}.rpc", exclusive=True, durable=False)
    got: list[str] = []
    svc = Service(f"{name}.svc")

    @svc.subscriber(events, binding_keys=["k"], queue=sub_queue)
    async def take(text: str) -> None:
        got.append(text)

    @svc.rpc(rpc_queue)
    async def add(n: int) -> int:
        return n + 1

    def said(level: int, text: str) -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.name == "amqpkit.broker" and r.levelno == level]
        return [line for line in lines if text in line]

    async with svc.serve(proxied_settings(proxy, amqp_url), grace=1) as running:
        owner = running.broker
        assert running.ready
        await hold_out(proxy, owner)  # both sides reset: the broker drops the connection and its queues at once
        async with Broker(settings) as thief:
            for queue in (sub_queue, rpc_queue):  # the broker deletes them a moment after the connection
                await until(functools.partial(_declared, thief, queue), timeout=10)
            await let_in(proxy, owner)
            await wait_for(lambda: len(said(logging.INFO, "another connection holds it")) == 2, timeout=10)
            await asyncio.sleep(2)
            ready, reason = running.readiness()
            assert not ready and running.error is None and running.failures == [], reason
            assert reason is not None and "RESOURCE_LOCKED" in reason and sub_queue.name in reason, reason
            assert sorted(owner.detached_consumers()) == sorted([sub_queue.name, rpc_queue.name])
            for consumer in owner.consumers:
                assert not consumer.attached.is_set() and not consumer.cancelled
                assert "RESOURCE_LOCKED" in str(consumer.error), consumer.error

            # a first consume() of a queue the other connection holds: refused at once, as before
            async with Broker(settings) as fresh:
                started = asyncio.get_running_loop().time()
                with pytest.raises(TopologyError, match="RESOURCE_LOCKED"):
                    await fresh.consume(Queue(sub_queue.name, exclusive=True, durable=False), _nothing)
                assert asyncio.get_running_loop().time() - started < 2
                assert fresh.consumers == ()

            # past three 2 s heartbeats and 10 s: one WARNING per queue, and still waiting
            await wait_for(lambda: len(said(logging.WARNING, "a live connection holds it")) == 2, timeout=25)
            await asyncio.sleep(2)
            assert not running.ready and running.error is None and running.failures == []
            assert len(said(logging.INFO, "another connection holds it")) == 2  # once, not at each attempt
            assert len(said(logging.WARNING, "a live connection holds it")) == 2
            assert not said(logging.ERROR, ""), said(logging.ERROR, "")
            assert len(said(logging.DEBUG, "is not attached")) == 2  # once per consumer
            assert owner.reconnects == 1
        # the other connection gone, so are its queues: declared again, attached, bound
        waited = await wait_for(lambda: running.ready, timeout=10)
        assert all(c.error is None and c.attached.is_set() for c in owner.consumers)
        await broker.publish(
            Envelope(b'"after"', content_type="application/json"), exchange=events.name, routing_key="k", mandatory=True
        )
        await wait_for(lambda: got == ["after"])
        async with RpcClient(broker, rpc_queue.name) as client:
            assert await client.call("add", 1, timeout=5) == 2
        assert not said(logging.ERROR, ""), said(logging.ERROR, "")
    print(f"back {waited:.2f} s after the other connection closed")
    with contextlib.suppress(Exception):
        await broker.delete_exchange(events.name)


async def _declared(broker: Broker, queue: Queue) -> bool:
    try:
        await broker.declare_queue(queue)
    except TopologyError:
        return False
    return True


async def _nothing(delivery: Delivery[bytes]) -> None:
    await delivery.ack()
