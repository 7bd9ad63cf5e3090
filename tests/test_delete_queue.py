"""``Broker.delete_queue``: what the Broker remembers when the broker refuses it, and its own consumers of the queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from amqpkit import Binding, Broker, BrokerSettings, Envelope, Exchange, Queue, TopologyError
from amqpkit.message import Delivery

from .deliveries import acked_bodies
from .reliability.proxy import FaultProxy
from .waiting import until_ready, wait_for


async def _bound(broker: Broker, name: str, cleanup: list[str]) -> tuple[Exchange, Queue, Binding]:
    """A direct exchange and a queue bound to it with key ``k``, declared, deleted after the test."""
    ex = Exchange(f"{name}.x", type="direct", durable=False, auto_delete=False)
    queue = Queue(f"{name}.q", auto_delete=False)
    binding = Binding(ex, queue, "k")
    cleanup += [f"q:{queue.name}", f"x:{ex.name}"]
    await broker.declare(ex, queue, binding)
    return ex, queue, binding


async def test_a_refused_delete_forgets_nothing(broker: Broker, name: str, cleanup: list[str]) -> None:
    # if_empty / if_unused refused (406): the queue is still there, and so must be what the Broker declares again
    # after a reconnect. It forgot the queue and its bindings before asking, and did not take them back.
    ex, queue, binding = await _bound(broker, name, cleanup)
    await broker.publish(Envelope(b"kept"), exchange=ex.name, routing_key="k")
    await until_ready(broker, queue.name, 1)
    with pytest.raises(TopologyError):
        await broker.delete_queue(queue, if_empty=True)
    assert broker.remembers(queue) and broker.remembers(binding)

    async with Broker(broker.settings) as other:

        async def hold(delivery: Delivery[bytes]) -> None:
            return None  # unsettled: back in the queue when its consumer stops

        reader = await other.consume(queue, hold, declare=False)
        with pytest.raises(TopologyError):
            await broker.delete_queue(queue.name, if_unused=True)
        await reader.cancel()
    assert broker.remembers(queue) and broker.remembers(binding)
    await until_ready(broker, queue.name, 1)


@pytest.mark.parametrize("declared", [True, False], ids=["declared-by-it", "declare-false"])
async def test_its_own_consumer_of_a_queue_it_deletes_stops_without_alarm(
    broker: Broker, name: str, caplog: pytest.LogCaptureFixture, declared: bool
) -> None:
    # The deletion was asked for: the consumer stops, its owner hears why (on_error), and nothing is logged as a
    # warning or an error. Before: "broker cancelled consumer ...; re-attaching" (WARNING), then "consumer ...
    # stopped: ... NOT_FOUND" (ERROR), as for a queue someone else deleted.
    queue = Queue(f"{name}.q", auto_delete=False)
    if not declared:
        async with Broker(broker.settings) as owner:
            await owner.declare_queue(queue)
    other = Queue(f"{name}.other", auto_delete=False)
    errors: list[BaseException] = []
    got, take = acked_bodies()
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(delivery: Delivery[bytes]) -> None:
        started.set()
        await release.wait()
        await delivery.ack()

    try:
        consumer = await broker.consume(queue, slow, declare=declared, on_error=errors.append)
        kept = await broker.consume(other, take)
        await broker.publish(Envelope(b"in-flight"), routing_key=queue.name)
        await asyncio.wait_for(started.wait(), 5)
        with caplog.at_level(logging.INFO, logger="amqpkit"):
            await broker.delete_queue(queue.name if not declared else queue)
            await wait_for(lambda: consumer.cancelled, 10)
            release.set()  # its handler's ack comes after the deletion: nothing to close the connection over
            await asyncio.sleep(0.5)
            await broker.publish(Envelope(b"after"), routing_key=other.name)
            await wait_for(lambda: got == [b"after"], 5)
        assert kept.attached.is_set() and not kept.cancelled
        assert len(errors) == 1 and consumer.error is errors[0]
        assert isinstance(errors[0], TopologyError) and "delete_queue" in str(errors[0])
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("amqpkit")]
        assert not loud, [r.getMessage() for r in loud]
        assert any("delete_queue" in r.getMessage() for r in caplog.records), "the stop is said, at INFO"
        assert broker.consumers == (kept,)
        with pytest.raises(TopologyError):
            await broker.queue_counts(queue)  # not declared again by a re-attach
    finally:
        release.set()
        await broker.delete_queue(other)
        await broker.delete_queue(queue)


async def test_declared_again_it_is_read_again(broker: Broker, name: str, caplog: pytest.LogCaptureFixture) -> None:
    # A queue deleted through the Broker and declared again by it is an ordinary queue again: a broker cancel
    # there later is re-attached as before, not taken for that deletion.
    queue = Queue(f"{name}.q", auto_delete=False)
    got, take = acked_bodies()
    try:
        await broker.declare_queue(queue)
        await broker.delete_queue(queue)
        consumer = await broker.consume(queue, take)
        with caplog.at_level(logging.WARNING, logger="amqpkit"):
            async with Broker(broker.settings) as other:
                await other.delete_queue(queue.name)  # someone else's deletion: the queue is declared again
            # the broker's cancel may come after the delete-ok (RabbitMQ 4.0.5): until it has, the consumer is
            # still attached, and a message published meanwhile has no queue to go to
            await wait_for(lambda: "re-attaching" in caplog.text, 10)
        await wait_for(lambda: consumer.attached.is_set() and not consumer.cancelled, 10)
        await broker.publish(Envelope(b"again"), routing_key=queue.name, mandatory=True)
        await wait_for(lambda: got == [b"again"], 10)
        assert consumer.error is None
    finally:
        await broker.delete_queue(queue)


async def test_a_name_it_deleted_once_is_not_taken_for_its_deletion_later(
    broker: Broker, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The Broker deletes a name (a cleanup), then reads a queue of that name someone else declared, without
    # declaring it: that owner's deletion later is theirs, said as such (an ERROR and the broker's NOT_FOUND), not
    # taken for the Broker's own deletion of long before.
    queue = Queue(f"{name}.q", auto_delete=False)
    got, take = acked_bodies()
    errors: list[BaseException] = []
    async with Broker(broker.settings) as owner:
        try:
            await broker.delete_queue(queue.name)
            await owner.declare_queue(queue)
            consumer = await broker.consume(queue, take, declare=False, on_error=errors.append)
            await owner.publish(Envelope(b"read"), routing_key=queue.name)
            await wait_for(lambda: got == [b"read"], 10)
            await owner.delete_queue(queue)
            await wait_for(lambda: consumer.cancelled, 10)
            assert len(errors) == 1 and "NOT_FOUND" in str(errors[0]) and "delete_queue" not in str(errors[0])
            assert any(r.levelno == logging.ERROR and "stopped" in r.getMessage() for r in caplog.records)
        finally:
            await owner.delete_queue(queue)


async def test_a_delete_while_the_connection_comes_back_forgets_nothing(
    proxied: BrokerSettings, proxy: FaultProxy, name: str
) -> None:
    # The queue went with the connection (auto-delete); the reconnect under way declares it again and attaches its
    # consumer, and only then is the delete sent: refused (in use), it must leave both as they were. It had been
    # forgotten before the reconnect got to it: not declared again, its consumer stopped with a 404.
    queue = Queue(f"{name}.q", auto_delete=True)
    got, take = acked_bodies()
    async with Broker(proxied) as broker:
        consumer = await broker.consume(queue, take)
        proxy.cut()
        await wait_for(lambda: not broker.is_connected, 5)
        with pytest.raises(TopologyError):
            await broker.delete_queue(queue, if_unused=True)
        assert broker.remembers(queue)
        await wait_for(lambda: consumer.attached.is_set() or consumer.cancelled, 10)
        assert not consumer.cancelled, consumer.error
        await broker.publish(Envelope(b"still"), routing_key=queue.name)
        await wait_for(lambda: got == [b"still"], 10)


async def test_a_refused_exchange_delete_forgets_nothing(broker: Broker, name: str, cleanup: list[str]) -> None:
    # delete_exchange(if_unused=True) of an exchange with a binding is refused (406): it had forgotten the exchange
    # and its bindings before asking, so a reconnect would not declare or bind them again.
    ex, _, binding = await _bound(broker, name, cleanup)
    with pytest.raises(TopologyError):
        await broker.delete_exchange(ex, if_unused=True)
    assert broker.remembers(ex) and broker.remembers(binding)


async def test_a_delete_given_up_on_after_it_was_sent_stays_a_delete(
    proxied: BrokerSettings, proxy: FaultProxy, broker: Broker, name: str
) -> None:
    # The delete reached the broker, but its caller stopped waiting before the answer (a timeout): the queue is
    # gone, so it stays forgotten and its consumer stops as for any delete of its own. It had been remembered
    # again: the consumer re-attached and declared the queue again, for nobody.
    queue = Queue(f"{name}.q", auto_delete=False)
    _, take = acked_bodies()
    async with Broker(proxied) as mine:
        try:
            consumer = await mine.consume(queue, take)
            proxy.latency = 0.5  # each way: the delete is at the broker after 0.5 s, its answer back after 1.0
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(mine.delete_queue(queue), 0.75)
            await wait_for(lambda: consumer.cancelled, 10)
            proxy.latency = 0
            assert "delete_queue" in str(consumer.error)
            assert not mine.remembers(queue)
            await asyncio.sleep(0.5)
            with pytest.raises(TopologyError):
                await broker.queue_counts(queue)  # not declared again
        finally:
            proxy.latency = 0
            await broker.delete_queue(queue)


async def test_a_second_delete_given_up_on_leaves_the_first_ones_consumers_to_it(broker: Broker, name: str) -> None:
    # Two deletes of one queue, the second cancelled before it is answered: the consumers the first one is
    # deleting under still stop as deleted by it (the broker's cancel often comes after the delete-ok), not
    # with an ERROR and the broker's 404.
    errors: list[BaseException] = []
    queue = Queue(f"{name}.q", type="quorum")
    _, take = acked_bodies()
    consumer = await broker.consume(queue, take, on_error=errors.append)
    first = asyncio.create_task(broker.delete_queue(queue))
    second = asyncio.create_task(broker.delete_queue(queue.name))
    await first
    second.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await second
    await wait_for(lambda: consumer.cancelled, 10)
    assert len(errors) == 1 and "delete_queue" in str(errors[0]), errors


async def test_a_server_named_queue_deleted_while_the_connection_comes_back(
    proxied: BrokerSettings, proxy: FaultProxy, name: str
) -> None:
    # Its name is the one the reconnect gave it: the delete must go to that name, not to the old one (gone with
    # the old connection), which it answered with 0 while the queue and its consumer went on.
    queue = Queue("", exclusive=True)
    _, take = acked_bodies()
    async with Broker(proxied) as mine:
        consumer = await mine.consume(queue, take)
        old = mine.queue_name(queue)
        proxy.cut()
        await wait_for(lambda: not mine.is_connected, 5)
        await mine.delete_queue(queue)
        assert not mine.remembers(queue)
        await wait_for(lambda: consumer.cancelled, 10)
        assert "delete_queue" in str(consumer.error) and old not in str(consumer.error)
