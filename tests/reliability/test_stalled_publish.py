"""Calls awaiting the broker's answer when the link goes silent (the heartbeat calls it dead).

aiormq ends a connection whose heartbeat found it silent by cancelling its reader, and rejects every call in
flight with that ``CancelledError``. A confirmed publish (``WorkQueue.enqueue`` too), a ``get``, a declare or a
purge waiting there raised ``asyncio.CancelledError`` in a task nobody had cancelled: the publish was not sent
again after the reconnect (the message lost: 1 of 2 bodies in the queue), and a publisher loop catching
``Exception`` died of it. A hunt found it with a 2 s heartbeat, after about 4 s of silence.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from amqpkit import Broker, BrokerSettings, ConnectionLost, Envelope, Queue, WorkQueue

from .conftest import HEARTBEAT
from .proxy import FaultProxy

Call = Callable[[], Coroutine[Any, Any, Any]]
SILENCE_NOTICED = 2 * HEARTBEAT + 1.0  # seconds: the heartbeat's grace, and a little


async def _wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


async def _bodies(settings: BrokerSettings, queue: str) -> list[bytes]:
    """Every message in ``queue``, read over a connection of its own (not through the proxy), acked."""
    got: list[bytes] = []
    async with Broker(settings) as reader:
        while (delivery := await reader.get(queue)) is not None:
            got.append(delivery.body)
            await delivery.ack()
    return got


async def _through_a_stall(proxy: FaultProxy, call: Call) -> asyncio.Task[Any]:
    """``call`` started once the link has gone silent, and left to end; its task, done."""
    await asyncio.sleep(HEARTBEAT)  # heartbeats flowing
    proxy.stall()
    task = asyncio.create_task(call())
    try:
        await asyncio.wait({task}, timeout=SILENCE_NOTICED + 15)
    finally:
        proxy.resume()
    assert task.done(), "the call did not end after the link went silent"
    assert not task.cancelled(), "the call raised CancelledError though nobody cancelled it"
    return task


@pytest.fixture
async def queue(settings: BrokerSettings, name: str) -> Any:
    async with Broker(settings) as admin:
        await admin.declare_queue(Queue(f"{name}.stalled"))
        try:
            yield f"{name}.stalled"
        finally:
            await admin.delete_queue(f"{name}.stalled")


async def test_a_confirmed_publish_in_flight_when_the_link_goes_silent_is_sent_again(
    proxied: BrokerSettings, proxy: FaultProxy, settings: BrokerSettings, queue: str
) -> None:
    async with Broker(proxied) as b:
        await b.publish(Envelope(b"one"), routing_key=queue)
        reconnects = b.reconnects
        task = await _through_a_stall(proxy, lambda: b.publish(Envelope(b"two"), routing_key=queue))
        assert task.exception() is None, task.exception()
        assert b.reconnects > reconnects
    bodies = await _bodies(settings, queue)
    # at least once: the copy written before the silence may reach the broker too, once the proxy forwards again
    assert bodies.count(b"one") == 1 and bodies.count(b"two") >= 1, bodies


async def test_a_task_enqueued_when_the_link_goes_silent_is_sent_again(
    proxied: BrokerSettings, proxy: FaultProxy, settings: BrokerSettings, name: str
) -> None:
    async with Broker(proxied) as b:
        work: WorkQueue[Any] = WorkQueue(b, f"{name}.work")
        try:
            await work.declare()
            task = await _through_a_stall(proxy, lambda: work.enqueue({"n": 1}, task_id="t-1"))
            assert task.exception() is None, task.exception()
            assert task.result() == "t-1"
            got = await b.get(work.queue.name)
            assert got is not None and got.message_id == "t-1"
            await got.ack()
        finally:
            await b.delete_queue(work.queue.name)
            await b.delete_queue(work.dlq.name)


@pytest.mark.parametrize("operation", ["get", "declare_queue", "purge_queue", "publish_unconfirmed"])
async def test_a_call_waiting_on_a_silent_link_ends_as_a_lost_connection(
    proxied: BrokerSettings, proxy: FaultProxy, queue: str, name: str, operation: str
) -> None:
    async with Broker(proxied) as b:
        calls: dict[str, Call] = {
            "get": lambda: b.get(queue),
            "declare_queue": lambda: b.declare_queue(Queue(f"{name}.declared", exclusive=True)),
            "purge_queue": lambda: b.purge_queue(queue),
            # Unconfirmed publishes until one waits: the stalled socket's buffers fill and the writer blocks.
            "publish_unconfirmed": lambda: _publish_until_it_fails(b, queue),
        }
        task = await _through_a_stall(proxy, calls[operation])
        error = task.exception()
        assert error is None or isinstance(error, ConnectionLost), repr(error)
        await _wait_for(lambda: b.is_connected, 15)
        await b.declare_queue(Queue(f"{name}.after", exclusive=True))  # the Broker works again


async def _publish_until_it_fails(b: Broker, queue: str) -> None:
    body = b"x" * 65536
    deadline = time.monotonic() + SILENCE_NOTICED + 10
    while time.monotonic() < deadline:
        await b.publish(Envelope(body), routing_key=f"{queue}.nobody", confirm=False)
