"""A consumer of a stream (``x-stream-offset``) kept across a reconnect resumes where it got to.

The Broker re-attaches every consumer after a reconnect, with the arguments given to ``consume()``. For a stream
those say where to start reading: attached again with ``"next"`` (or ``"last"``, or a timestamp), what was
appended while the connection was down is never delivered; with ``"first"`` (or an offset), everything read before
is delivered again. Measured on RabbitMQ 4.0.5: 'next', 3 messages appended during a 1 s outage never delivered;
'first', the 5 read before the cut delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re

import pytest

from amqpkit import (
    Broker,
    Delivery,
    Envelope,
    Exchange,
    Queue,
    QueueType,
    ReconnectPolicy,
    Settlement,
    Subscriber,
    TopologyError,
)

from ..brokerctl import arabbitmqctl, vhost_of
from ..deliveries import acked_bodies, acked_offsets
from ..waiting import until, wait_for
from .proxy import FaultProxy, hold_out, let_in, proxied_settings


async def test_a_stream_consumer_from_next_misses_nothing_appended_during_a_reconnect(
    broker: Broker, proxy: FaultProxy, amqp_url: str, name: str
) -> None:
    stream = Queue(f"{name}.stream", type=QueueType.STREAM)
    await broker.declare_queue(stream)
    offsets, take = acked_offsets()

    slow = ReconnectPolicy(initial_delay=1.0, max_delay=1.0, jitter=0)
    try:
        async with Broker(proxied_settings(proxy, amqp_url, reconnect=slow)) as reader:
            await reader.consume(stream, take, prefetch=50, arguments={"x-stream-offset": "next"})
            await broker.publish(Envelope(b"0"), routing_key=stream.name)
            await wait_for(lambda: offsets == [0])
            assert proxy.cut()
            for n in range(1, 4):  # appended while the reader reconnects
                await broker.publish(Envelope(str(n).encode()), routing_key=stream.name)
            await reader.wait_connected()
            await asyncio.sleep(1)
            await broker.publish(Envelope(b"4"), routing_key=stream.name)
            await wait_for(lambda: 4 in offsets)
            # before: [0, 4], offsets 1 to 3 never delivered
            assert sorted(set(offsets)) == [0, 1, 2, 3, 4], offsets
    finally:
        await broker.delete_queue(stream.name)


async def test_a_stream_consumer_from_first_is_not_given_the_stream_again_after_a_reconnect(
    broker: Broker, proxy: FaultProxy, amqp_url: str, name: str
) -> None:
    stream = Queue(f"{name}.stream", type=QueueType.STREAM)
    await broker.declare_queue(stream)
    offsets, take = acked_offsets()

    try:
        for n in range(5):
            await broker.publish(Envelope(str(n).encode()), routing_key=stream.name)
        async with Broker(proxied_settings(proxy, amqp_url)) as reader:
            await reader.consume(stream, take, prefetch=50, arguments={"x-stream-offset": "first"})
            await wait_for(lambda: len(offsets) == 5)
            assert proxy.cut()
            await reader.wait_connected()
            await broker.publish(Envelope(b"5"), routing_key=stream.name)
            await wait_for(lambda: 5 in offsets)
            await asyncio.sleep(0.5)
            # before: [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5], the whole stream again at each reconnect
            assert offsets == [0, 1, 2, 3, 4, 5]
    finally:
        await broker.delete_queue(stream.name)


async def test_a_stream_consumer_resumes_from_its_lowest_unsettled_offset(
    broker: Broker, proxy: FaultProxy, amqp_url: str, name: str
) -> None:
    """At least once: what was handed over and not settled when the connection went is delivered again, from the
    lowest such offset; what was settled before it is not."""
    stream = Queue(f"{name}.stream", type=QueueType.STREAM)
    await broker.declare_queue(stream)
    offsets: list[int] = []
    held: list[Delivery[bytes]] = []

    async def take(delivery: Delivery[bytes]) -> None:
        offset = int(delivery.headers["x-stream-offset"])
        offsets.append(offset)
        if offset in (2, 4) and len(offsets) <= 6:
            held.append(delivery)  # still being worked on when the connection goes: never settled
        else:
            await delivery.ack()

    try:
        for n in range(6):
            await broker.publish(Envelope(str(n).encode()), routing_key=stream.name)
        async with Broker(proxied_settings(proxy, amqp_url)) as reader:
            await reader.consume(stream, take, prefetch=50, arguments={"x-stream-offset": "first"})
            await wait_for(lambda: len(offsets) == 6)
            await asyncio.sleep(0.2)  # the acks of 0, 1, 3 and 5 written
            assert proxy.cut()
            await reader.wait_connected()
            await broker.publish(Envelope(b"6"), routing_key=stream.name)
            await wait_for(lambda: 6 in offsets)
            await asyncio.sleep(0.5)
            # from 2, the lowest unsettled offset: 3 and 5 again too, but not 0 and 1
            assert offsets == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6], offsets
    finally:
        await broker.delete_queue(stream.name)


async def test_a_stream_consumer_whose_channel_the_broker_closes_resumes_where_it_got_to(
    broker: Broker, name: str
) -> None:
    """A re-attach on the same connection (the broker closed the consumer's channel) resumes where it got to."""
    stream = Queue(f"{name}.stream", type=QueueType.STREAM)
    await broker.declare_queue(stream)
    offsets: list[int] = []
    seen: list[Delivery[bytes]] = []

    async def take(delivery: Delivery[bytes]) -> None:
        offsets.append(int(delivery.headers["x-stream-offset"]))
        seen.append(delivery)
        await delivery.ack()

    try:
        for n in range(3):
            await broker.publish(Envelope(str(n).encode()), routing_key=stream.name)
        consumer = await broker.consume(stream, take, prefetch=50, arguments={"x-stream-offset": "first"})
        try:
            await wait_for(lambda: len(offsets) == 3)
            channel = broker.lowlevel.channel_of(seen[-1])
            assert channel is not None
            await channel.basic_ack(10_000)  # an unknown delivery tag: the broker closes the channel (406)
            await wait_for(lambda: channel.is_closed, timeout=5)
            await asyncio.sleep(0.1)
            await asyncio.wait_for(consumer.attached.wait(), 10)
            await broker.publish(Envelope(b"3"), routing_key=stream.name)
            await wait_for(lambda: 3 in offsets)
            await asyncio.sleep(0.5)
            assert offsets == [0, 1, 2, 3], offsets  # before: [0, 1, 2, 0, 1, 2, 3]
        finally:
            await consumer.cancel()
    finally:
        await broker.delete_queue(stream.name)


async def test_a_stream_deleted_under_its_consumer_and_declared_again_is_read_from_its_start(
    broker: Broker, name: str
) -> None:
    """The broker cancels the consumer of a deleted stream; declared again, the new stream's messages all arrive
    (the old stream's offset, past the new one's end, reads from that end)."""
    stream = Queue(f"{name}.stream", type=QueueType.STREAM)
    offsets: list[int] = []
    bodies: list[bytes] = []

    async def take(delivery: Delivery[bytes]) -> None:
        offsets.append(int(delivery.headers["x-stream-offset"]))
        bodies.append(delivery.body)
        await delivery.ack()

    async with Broker(broker.settings) as reader:
        consumer = await reader.consume(stream, take, prefetch=50, arguments={"x-stream-offset": "first"})
        try:
            for n in range(5):
                await broker.publish(Envelope(f"old {n}".encode()), routing_key=stream.name)
            await wait_for(lambda: len(offsets) == 5)
            await broker.delete_queue(stream.name)

            async def declared_again() -> bool:  # by the reader (its own), which then attaches
                try:
                    await broker.queue_counts(stream.name)
                except TopologyError:
                    return False
                return True

            await until(declared_again, timeout=10, every=0.05)
            await asyncio.wait_for(consumer.attached.wait(), 10)
            await asyncio.sleep(0.2)
            for n in range(3):
                await broker.publish(Envelope(f"new {n}".encode()), routing_key=stream.name)
            await wait_for(lambda: b"new 2" in bodies)
            assert bodies[5:] == [b"new 0", b"new 1", b"new 2"], bodies
        finally:
            await consumer.cancel()
            await broker.delete_queue(stream.name)


async def test_a_stream_consumer_from_next_with_nothing_delivered_attaches_from_next_again(
    broker: Broker, proxy: FaultProxy, amqp_url: str, name: str
) -> None:
    """Before anything was delivered, the argument given stands: 'next' again, not the stream from its start."""
    stream = Queue(f"{name}.stream", type=QueueType.STREAM)
    await broker.declare_queue(stream)
    bodies, take = acked_bodies()

    try:
        await broker.publish(Envelope(b"before"), routing_key=stream.name)
        async with Broker(proxied_settings(proxy, amqp_url)) as reader:
            await reader.consume(stream, take, prefetch=50, arguments={"x-stream-offset": "next"})
            assert proxy.cut()
            await reader.wait_connected()
            for _ in range(100):  # until the re-attached consumer gets one: from "first", "before" would come first
                await broker.publish(Envelope(b"after"), routing_key=stream.name)
                if bodies:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)
            assert bodies and set(bodies) == {b"after"}, bodies
    finally:
        await broker.delete_queue(stream.name)


async def test_a_stream_deleted_during_an_outage_and_declared_again_by_the_reconnect_is_read_from_its_start(
    broker: Broker, proxy: FaultProxy, amqp_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleted (by another connection) while the consumer's connection is down, the stream its reconnect declares
    again is a new one, whose offsets start at 0: every message of it is delivered, none skipped for the offset the
    consumer had reached in the old one."""
    stream = Queue(f"{name}.stream", type=QueueType.STREAM)
    bodies, take = acked_bodies()

    try:
        async with Broker(proxied_settings(proxy, amqp_url)) as reader:
            consumer = await reader.consume(stream, take, prefetch=50, arguments={"x-stream-offset": "first"})
            for n in range(20):
                await broker.publish(Envelope(f"old {n}".encode()), routing_key=stream.name)
            await wait_for(lambda: len(bodies) == 20)
            await asyncio.sleep(0.2)  # the acks written: the reader would resume at offset 20
            await hold_out(proxy, reader)
            await broker.delete_queue(stream.name)
            await let_in(proxy, reader)  # its reconnect declares the stream again: a new one
            await asyncio.wait_for(consumer.attached.wait(), 10)
            new = [f"new {n}".encode() for n in range(25)]
            for body in new:
                await broker.publish(Envelope(body), routing_key=stream.name)
            with contextlib.suppress(AssertionError):
                await wait_for(lambda: len(bodies) >= 45, timeout=5)
            await asyncio.sleep(0.3)
            # before: ['new 20', ..., 'new 24'], the first 20 skipped (the old stream's offset, 20)
            assert bodies[20:] == new, bodies[20:]
            said = [
                r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "new stream" in r.message
            ]
            assert len(said) == 1, said
            assert f"its stream '{stream.name}' was deleted while the connection was down" in said[0], said
            assert "not from offset 20, where it had got to in the old one" in said[0], said
    finally:
        await broker.delete_queue(stream.name)


async def test_a_stream_deleted_under_a_consumer_given_a_numeric_offset_is_read_from_the_new_streams_start(
    broker: Broker, name: str
) -> None:
    """A consumer started at a stored offset (a number): its stream deleted under it and declared again by the
    re-attach, that number means nothing in the new stream, whose messages all arrive."""
    stream = Queue(f"{name}.stream", type=QueueType.STREAM)
    await broker.declare_queue(stream)
    bodies, take = acked_bodies()

    try:
        for n in range(5):
            await broker.publish(Envelope(f"old {n}".encode()), routing_key=stream.name)
        async with Broker(broker.settings) as reader:
            consumer = await reader.consume(stream, take, prefetch=50, arguments={"x-stream-offset": 3})
            try:
                await wait_for(lambda: len(bodies) == 2)
                await asyncio.sleep(0.2)
                await broker.delete_queue(stream.name)

                async def declared_again() -> bool:  # by the reader (its own), which then attaches
                    try:
                        await broker.queue_counts(stream.name)
                    except TopologyError:
                        return False
                    return True

                await until(declared_again, timeout=10, every=0.05)
                await asyncio.wait_for(consumer.attached.wait(), 10)
                new = [f"new {n}".encode() for n in range(5)]
                for body in new:
                    await broker.publish(Envelope(body), routing_key=stream.name)
                with contextlib.suppress(AssertionError):
                    await wait_for(lambda: len(bodies) >= 7, timeout=5)
                await asyncio.sleep(0.3)
                # before: ['new 3', 'new 4'], read from offset 3 (the argument given) of the new stream
                assert bodies == [b"old 3", b"old 4", *new], bodies
            finally:
                await consumer.cancel()
    finally:
        await broker.delete_queue(stream.name)


async def test_a_stream_consumer_resumed_at_an_offset_retention_removed_says_how_many_offsets_it_skipped(
    broker: Broker, proxy: FaultProxy, amqp_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While the consumer's connection is down, enough is appended that the stream's retention (x-max-length-bytes,
    whole segments at a time) removes the offset it resumes at: the broker starts at its first offset still there,
    and what lay between is never delivered. That cannot be helped, but it is said, and counted."""
    stream = Queue(
        f"{name}.stream",
        type=QueueType.STREAM,
        max_length_bytes=20_000,
        arguments={"x-stream-max-segment-size-bytes": 5_000},
    )
    await broker.declare_queue(stream)
    offsets, take = acked_offsets()

    try:
        for n in range(5):
            await broker.publish(Envelope(str(n).encode()), routing_key=stream.name)
        async with Broker(proxied_settings(proxy, amqp_url)) as reader:
            consumer = await reader.consume(stream, take, prefetch=50, arguments={"x-stream-offset": "first"})
            await wait_for(lambda: len(offsets) == 5)
            await asyncio.sleep(0.2)  # the acks written: the reader resumes at offset 5
            await hold_out(proxy, reader)
            for _ in range(400):  # 200 kB, in segments of 5 kB of which about 20 kB are kept
                await broker.publish(Envelope(b"x" * 500), routing_key=stream.name)
            await asyncio.sleep(0.5)  # the broker applies retention when a segment is rolled over, in the background
            with caplog.at_level(logging.WARNING, logger="amqpkit.broker"):
                await let_in(proxy, reader)
                await wait_for(lambda: len(offsets) > 5, timeout=10)
                await asyncio.sleep(0.3)
            first = offsets[5]
            assert first > 6, offsets  # the resume point went with the oldest segments
            skipped = first - 5
            said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "retention" in r.message]
            # before: nothing said, the 'skipped' offsets silently never delivered
            assert len(said) == 1, said
            assert f"resumed at offset 5, the broker started at {first}: {skipped} offsets skipped" in said[0], said
            assert consumer.skipped_offsets == skipped
    finally:
        await broker.delete_queue(stream.name)


async def test_a_stream_consumer_overtaken_by_retention_while_attached_says_how_many_offsets_it_skipped(
    broker: Broker, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer that reads slower than the stream is written, under an operator's retention policy
    (``max-length-bytes``): the broker removes the segments ahead of it and goes on at the first offset still
    there, with no reconnect in between. Before, nothing was said (4.0.5: offsets 95 to 1769 and two more runs of
    them skipped in one attach, ``skipped_offsets`` 0); it is said and counted as a resumed attach's gap is."""
    stream = Queue(f"{name}.stream", type=QueueType.STREAM, arguments={"x-stream-max-segment-size-bytes": 5_000})
    await broker.declare_queue(stream)
    vhost = vhost_of(broker.settings.urls[0])
    policy = f"{name}.retention"
    offsets: list[int] = []
    release = asyncio.Event()

    async def slow(delivery: Delivery[bytes]) -> None:
        offsets.append(int(delivery.headers["x-stream-offset"]))
        await release.wait()  # behind the writer: the first delivery is held until the retention has run
        await delivery.ack()

    try:
        with caplog.at_level(logging.WARNING, logger="amqpkit.broker"):
            consumer = await broker.consume(stream, slow, prefetch=1, arguments={"x-stream-offset": "first"})
            for _ in range(5):
                await broker.publish(Envelope(b"x" * 500), routing_key=stream.name)
            await wait_for(lambda: offsets == [0])
            await arabbitmqctl("set_policy", "-p", vhost, policy, f"^{re.escape(stream.name)}$",
                               '{"max-length-bytes": 20000}', "--apply-to", "queues")  # fmt: skip
            for _ in range(400):  # 200 kB, in segments of 5 kB of which about 20 kB are kept
                await broker.publish(Envelope(b"x" * 500), routing_key=stream.name)
            await asyncio.sleep(1)  # the broker applies retention when a segment is rolled over, in the background
            release.set()
            await wait_for(lambda: offsets[-1] >= 400, timeout=20)
            await asyncio.sleep(0.3)
        gaps = [(before, after) for before, after in itertools.pairwise(offsets) if after > before + 2]
        assert gaps, offsets  # retention went past the consumer
        skipped = sum(after - before - 1 for before, after in gaps)
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "retention" in r.message]
        # before: [] and 0, the skipped offsets never delivered with nothing said
        assert len(said) == len(gaps), said
        before, after = gaps[0]
        assert f"was handed offset {after} after {before}: {after - before - 1} offsets skipped" in said[0], said
        assert consumer.skipped_offsets == skipped
        await consumer.cancel()
    finally:
        release.set()
        await arabbitmqctl("clear_policy", "-p", vhost, policy)
        await broker.delete_queue(stream.name)


async def test_a_stream_consumer_given_a_filter_is_not_said_to_skip_what_the_filter_leaves_out(
    broker: Broker, proxy: FaultProxy, amqp_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer with an ``x-stream-filter`` is handed only some offsets: a gap after its resume point is the
    filter's doing, not retention's, and nothing is said of it."""
    stream = Queue(f"{name}.stream", type=QueueType.STREAM)
    await broker.declare_queue(stream)
    offsets, take = acked_offsets()

    try:
        await broker.publish(Envelope(b"0"), routing_key=stream.name)
        async with Broker(proxied_settings(proxy, amqp_url)) as reader:
            arguments = {"x-stream-offset": "first", "x-stream-filter": "red", "x-stream-match-unfiltered": True}
            consumer = await reader.consume(stream, take, prefetch=50, arguments=arguments)
            await wait_for(lambda: offsets == [0])
            await asyncio.sleep(0.2)
            await hold_out(proxy, reader)
            for n in range(5):  # none of them matches the filter: given to the consumer they would be 1 to 5
                await broker.publish(Envelope(str(n).encode(), headers={"x-stream-filter-value": "blue"}),
                                     routing_key=stream.name)  # fmt: skip
            await broker.publish(Envelope(b"6"), routing_key=stream.name)  # unfiltered: matches
            with caplog.at_level(logging.WARNING, logger="amqpkit.broker"):
                await let_in(proxy, reader)
                await wait_for(lambda: 6 in offsets, timeout=10)
                await asyncio.sleep(0.3)
            if broker.server_version >= (3, 13):  # filters came in 3.13; 3.10 hands over all of them: no gap
                assert offsets == [0, 6], offsets
            said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "retention" in r.message]
            assert said == [], said
            assert consumer.skipped_offsets == 0
    finally:
        await broker.delete_queue(stream.name)


async def test_consuming_a_stream_with_auto_ack_is_refused_before_the_broker_closes_the_connection(
    broker: Broker, name: str
) -> None:
    """RabbitMQ does not deliver a stream to an auto-ack consumer: it closes the whole connection (540
    NOT_IMPLEMENTED), cutting every other consumer and publish of the Broker. consume() says so first."""
    stream = Queue(f"{name}.stream", type=QueueType.STREAM)
    by_argument = Queue(f"{name}.stream", arguments={"x-queue-type": "stream"})
    await broker.declare_queue(stream)
    bodies, take = acked_bodies()

    try:
        reconnects = broker.reconnects
        with pytest.raises(ValueError, match="auto_ack"):
            await broker.consume(stream, take, auto_ack=True)
        with pytest.raises(ValueError, match="auto_ack"):
            await broker.consume(by_argument, take, auto_ack=True, declare=False)
        with pytest.raises(ValueError, match="auto_ack"):
            Subscriber(broker, Exchange(""), take, queue=stream, auto_ack=True)
        await asyncio.sleep(0.3)
        # before: the broker closed the connection at the first consume, and the Broker reconnected
        assert broker.is_connected and broker.reconnects == reconnects
        assert broker.consumers == ()
        consumer = await broker.consume(stream, take, prefetch=10, arguments={"x-stream-offset": "first"})
        try:
            await broker.publish(Envelope(b"after"), routing_key=stream.name)
            await wait_for(lambda: bodies == [b"after"])
            assert broker.reconnects == reconnects
        finally:
            await consumer.cancel()
    finally:
        await broker.delete_queue(stream.name)


async def test_a_stream_delivery_nacked_or_rejected_leaves_the_connection_up_and_is_reported_as_asked(
    broker: Broker, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ 3.10 closes the whole connection (540 NOT_IMPLEMENTED) at a basic.nack or basic.reject of a stream's
    delivery; 4.0 takes them, and does nothing else for them than for an ack (a stream neither requeues nor
    dead-letters). The Broker writes an ack to a broker before 4.0; the delivery says what its reader asked."""
    stream = Queue(f"{name}.stream", type=QueueType.STREAM)
    await broker.declare_queue(stream)
    outcomes: dict[int, Settlement | None] = {}

    async def take(delivery: Delivery[bytes]) -> None:
        offset = int(delivery.headers["x-stream-offset"])
        if offset == 0:
            await delivery.nack()
        elif offset == 1:
            await delivery.nack(requeue=False)
        elif offset == 2:
            await delivery.reject()
        else:
            await delivery.ack()
        outcomes[offset] = delivery.settled

    caplog.set_level(logging.DEBUG, logger="amqpkit.broker")
    try:
        reconnects = broker.reconnects
        consumer = await broker.consume(stream, take, prefetch=10, arguments={"x-stream-offset": "first"})
        try:
            for n in range(3):
                await broker.publish(Envelope(str(n).encode()), routing_key=stream.name)
            await wait_for(lambda: len(outcomes) == 3)
            await asyncio.sleep(0.3)
            await broker.publish(Envelope(b"3"), routing_key=stream.name)
            await wait_for(lambda: 3 in outcomes)
            await asyncio.sleep(0.3)
            assert outcomes == {
                0: Settlement.REQUEUED,
                1: Settlement.NACKED,
                2: Settlement.REJECTED,
                3: Settlement.ACKED,
            }, outcomes  # each delivered once: the connection stayed up, nothing was read again
            # before, on 3.10: the connection closed at the first nack, and the Broker reconnected
            assert broker.is_connected and broker.reconnects == reconnects
            said = [r.getMessage() for r in caplog.records if "is acked" in r.message]
            assert len(said) == (1 if broker.server_version < (4,) else 0), said  # once, for the three
        finally:
            await consumer.cancel()
    finally:
        await broker.delete_queue(stream.name)


async def test_a_stream_delivery_whose_callback_raises_is_settled_rather_than_read_again_with_all_after_it(
    broker: Broker, proxy: FaultProxy, amqp_url: str, name: str
) -> None:
    """A consume() callback that raises leaves its delivery unsettled. A stream's held a prefetch slot for good, and
    was where every re-attach read the stream again from, with everything read since. It is rejected now: a
    stream neither requeues nor dead-letters, and its message stays in the stream."""
    stream = Queue(f"{name}.stream", type=QueueType.STREAM)
    await broker.declare_queue(stream)
    offsets: list[int] = []
    failed: list[Delivery[bytes]] = []

    async def take(delivery: Delivery[bytes]) -> None:
        offset = int(delivery.headers["x-stream-offset"])
        offsets.append(offset)
        if offset == 1:
            failed.append(delivery)
            raise RuntimeError("offset 1 cannot be handled")
        await delivery.ack()

    try:
        for n in range(5):
            await broker.publish(Envelope(str(n).encode()), routing_key=stream.name)
        async with Broker(proxied_settings(proxy, amqp_url)) as reader:
            await reader.consume(stream, take, prefetch=50, arguments={"x-stream-offset": "first"})
            await wait_for(lambda: len(offsets) == 5)
            await asyncio.sleep(0.2)  # the settlements written
            assert failed[0].settled is Settlement.REJECTED
            assert proxy.cut()
            await reader.wait_connected()
            await broker.publish(Envelope(b"5"), routing_key=stream.name)
            await wait_for(lambda: 5 in offsets)
            await asyncio.sleep(0.5)
            # before: [0, 1, 2, 3, 4, 1, 2, 3, 4, 5], read again from the failed delivery at each re-attach
            assert offsets == [0, 1, 2, 3, 4, 5], offsets
    finally:
        await broker.delete_queue(stream.name)
