"""Benchmark scenarios: a serving side and a driving side for each.

The serving side (RPC server or consumer) runs in its own process by
default, as a real service would (``python -m amqpkit.bench.serve``), or in
the driver's event loop with ``inproc``. One-way latency is measured by the
consumer, from the send time carried in the message (``t``, monotonic
nanoseconds; both processes share the machine's monotonic clock) to the
moment the handler runs; RPC latency by the caller, for the full round trip.
In open-loop mode the send time is the *intended* one, so a stall delays
every message scheduled behind it and shows in the percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

from ..codec import BytesCodec
from ..connection import Broker
from ..message import Delivery
from ..patterns.pubsub import Publisher, Subscriber
from ..patterns.rpc import RpcClient, RpcServer
from ..patterns.work_queue import Worker, WorkQueue
from ..settings import BrokerSettings
from ..topology import Exchange, Queue, QueueType
from .stats import LatencyRecorder


class Window:
    """The driver's view of one-way messages in flight: sent, and not yet handled by the consumer."""

    def __init__(self) -> None:
        self.sent = 0
        self.handled = 0
        self._moved = asyncio.Event()

    def handled_some(self, count: int = 1) -> None:
        self.handled += count
        self._moved.set()

    async def acquire(self, limit: int) -> None:
        while self.sent - self.handled >= limit:
            self._moved.clear()
            await self._moved.wait()
        self.sent += 1


__all__ = ["CLIENTS", "SCENARIOS", "SERVERS", "ClientSide", "ServerOptions", "ServerSide", "Window", "is_rpc"]

SEND_TIME = "t"
WARMUP = "w"


@dataclass(frozen=True, slots=True)
class ServerOptions:
    url: str
    queue: str
    prefetch: int = 256
    queue_type: str = "classic"
    stall_ms: int = 0
    stall_after: int = 0
    progress_fd: int | None = None


def is_rpc(scenario: str) -> bool:
    return "rpc" in scenario


# --------------------------------------------------------------------- serving side


class ServerSide(ABC):
    """The serving half: starts, counts what it handled, reports, resets between runs."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.recorder = LatencyRecorder()
        self.received = 0
        self.errors = 0
        self.last_ns = 0
        self._handled_total = 0
        self._stalled = False
        self.on_handled: Callable[[], None] | None = None
        if options.progress_fd is not None:
            fd = options.progress_fd
            self.on_handled = lambda: _tell(fd)

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    async def maybe_stall(self) -> None:
        """Stall once for ``stall_ms`` after ``stall_after`` messages (for testing that stalls are seen)."""
        self._handled_total += 1
        o = self.options
        if o.stall_ms and not self._stalled and self._handled_total > o.stall_after:
            self._stalled = True
            await asyncio.sleep(o.stall_ms / 1000)

    def observe(self, headers: Any) -> None:
        """Record a one-way message's latency from its headers (warm-up messages are not counted)."""
        now = time.monotonic_ns()
        if self.on_handled is not None:
            self.on_handled()
        if headers and headers.get(WARMUP):
            return
        sent = headers.get(SEND_TIME) if headers else None
        if isinstance(sent, int):
            self.recorder.record_ns(now - sent)
        else:
            self.errors += 1
        self.received += 1
        self.last_ns = now

    def reset(self) -> None:
        self.recorder = LatencyRecorder()
        self.received = 0
        self.errors = 0
        self.last_ns = 0

    async def report(self, expected: int, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until ``expected`` measured messages arrived (one-way) or return at once (RPC)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.received < expected and loop.time() < end:  # noqa: ASYNC110 - polling a counter
            await asyncio.sleep(0.005)
        return {
            "received": self.received,
            "errors": self.errors,
            "last_ns": self.last_ns,
            "hist": self.recorder.encode(),
        }


def _tell(fd: int) -> None:
    """One byte to the driver per handled message: the driver's in-flight window moves on."""
    with contextlib.suppress(BlockingIOError):  # the driver is behind reading; it counts what it gets
        os.write(fd, b"\x01")


class AmqpkitRpcServer(ServerSide):
    async def start(self) -> None:
        self.broker = Broker(BrokerSettings(url=self.options.url))
        await self.broker.connect()
        self.server = RpcServer(
            self.broker, Queue(self.options.queue, durable=False, auto_delete=True), concurrency=self.options.prefetch
        )

        async def echo(body: bytes) -> bytes:
            await self.maybe_stall()
            self.received += 1
            return body

        self.server.add("echo", echo, codec=BytesCodec())
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()
        await self.broker.close()


class AmqpkitOnewayConsumer(ServerSide):
    confirmed = False

    async def start(self) -> None:
        self.broker = Broker(BrokerSettings(url=self.options.url))
        await self.broker.connect()
        queue_type = QueueType(self.options.queue_type) if self.confirmed else QueueType.CLASSIC
        queue = Queue(self.options.queue, type=queue_type, durable=self.confirmed)
        await self.broker.declare_queue(queue)

        async def handler(delivery: Delivery[bytes]) -> None:
            await self.maybe_stall()
            self.observe(delivery.envelope.headers)
            if not self.subscriber.auto_ack:
                await delivery.ack()

        self.subscriber: Subscriber[bytes] = Subscriber(
            self.broker, Exchange(""), handler, queue=queue, prefetch=self.options.prefetch, auto_ack=not self.confirmed
        )
        await self.subscriber.start()

    async def stop(self) -> None:
        await self.subscriber.stop()
        await self.broker.delete_queue(self.options.queue)
        await self.broker.close()


class AmqpkitConfirmedConsumer(AmqpkitOnewayConsumer):
    confirmed = True


class RawRpcServer(ServerSide):
    async def start(self) -> None:
        self.conn = await aiormq.connect(self.options.url)
        self.channel = await self.conn.channel(publisher_confirms=False)
        await self.channel.queue_declare(self.options.queue, auto_delete=True)
        await self.channel.basic_qos(prefetch_count=self.options.prefetch)
        channel = self.channel

        async def on_request(message: DeliveredMessage) -> None:
            await self.maybe_stall()
            props = message.header.properties
            await channel.basic_publish(
                message.body,
                routing_key=props.reply_to or "",
                properties=Basic.Properties(correlation_id=props.correlation_id),
            )
            await channel.basic_ack(message.delivery_tag or 0)
            self.received += 1

        await self.channel.basic_consume(self.options.queue, on_request)

    async def stop(self) -> None:
        await self.conn.close()


class RawOnewayConsumer(ServerSide):
    async def start(self) -> None:
        self.conn = await aiormq.connect(self.options.url)
        self.channel = await self.conn.channel(publisher_confirms=False)
        await self.channel.queue_declare(self.options.queue, durable=False)
        await self.channel.basic_qos(prefetch_count=self.options.prefetch)

        async def on_message(message: DeliveredMessage) -> None:
            await self.maybe_stall()
            self.observe(message.header.properties.headers)

        await self.channel.basic_consume(self.options.queue, on_message, no_ack=True)

    async def stop(self) -> None:
        await self.channel.queue_delete(self.options.queue)
        await self.conn.close()


class AiopikaRpcServer(ServerSide):
    """aio-pika's own RPC pattern (its JSON flavour: the default one pickles)."""

    async def start(self) -> None:
        import aio_pika
        from aio_pika.patterns import JsonRPC

        self.conn = await aio_pika.connect(self.options.url)
        self.channel = await self.conn.channel()
        await self.channel.set_qos(prefetch_count=self.options.prefetch)
        self.rpc = await JsonRPC.create(self.channel)

        async def echo(*, data: str) -> str:
            await self.maybe_stall()
            self.received += 1
            return data

        await self.rpc.register(self.options.queue, echo, auto_delete=True)

    async def stop(self) -> None:
        await self.rpc.close()
        await self.conn.close()


class AmqpkitWorkQueueWorker(ServerSide):
    """One worker process of the work queue (``--workers`` starts several)."""

    async def start(self) -> None:
        self.broker = Broker(BrokerSettings(url=self.options.url))
        await self.broker.connect()
        self.work: WorkQueue[bytes] = WorkQueue(self.broker, self.options.queue, BytesCodec())

        async def handler(delivery: Delivery[bytes]) -> None:
            await self.maybe_stall()
            self.observe(delivery.headers)

        self.worker: Worker[bytes] = Worker(self.work, handler, concurrency=self.options.prefetch)
        await self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop(grace=5)
        for name in (self.work.name, self.work.dlq_name):
            with contextlib.suppress(Exception):  # another worker process may have deleted it
                await self.broker.delete_queue(name)
        await self.broker.close()


class AiopikaConsumer(ServerSide):
    """Bare aio-pika: consume from a durable quorum queue and ack each message."""

    async def start(self) -> None:
        import aio_pika

        self.conn = await aio_pika.connect(self.options.url)
        self.channel = await self.conn.channel()
        await self.channel.set_qos(prefetch_count=self.options.prefetch)
        self.queue = await self.channel.declare_queue(
            self.options.queue, durable=True, arguments={"x-queue-type": "quorum"}
        )

        async def on_message(message: Any) -> None:
            await self.maybe_stall()
            self.observe(message.headers)
            await message.ack()

        await self.queue.consume(on_message)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.queue.delete(if_unused=False, if_empty=False)
        await self.conn.close()


SERVERS: dict[str, type[ServerSide]] = {
    "rpc": AmqpkitRpcServer,
    "rpc-reply-queue": AmqpkitRpcServer,
    "oneway": AmqpkitOnewayConsumer,
    "oneway-confirmed": AmqpkitConfirmedConsumer,
    "raw-rpc": RawRpcServer,
    "raw-oneway": RawOnewayConsumer,
    "aiopika-rpc": AiopikaRpcServer,
    "workqueue": AmqpkitWorkQueueWorker,
    "aiopika-workqueue": AiopikaConsumer,
}


# --------------------------------------------------------------------- driving side

Operation = Callable[[int, bool], Awaitable[None]]  # (send time ns, warm-up?) -> done


class ClientSide(ABC):
    """The driving half: one operation is one call (RPC) or one publish (one-way)."""

    def __init__(self, url: str, queue: str, size: int, queue_type: str = "classic") -> None:
        self.url = url
        self.queue = queue
        self.payload = os.urandom(size // 2 + 1).hex()[:size].encode()
        self.queue_type = queue_type

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def operate(self, sent_ns: int, warmup: bool) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    async def server_product(self) -> tuple[str, str]:
        return "", ""


class AmqpkitRpcClient(ClientSide):
    reply_queue: Any = "direct"

    async def start(self) -> None:
        self.broker = Broker(BrokerSettings(url=self.url))
        await self.broker.connect()
        self.client = RpcClient(self.broker, self.queue, codec=BytesCodec(), reply_queue=self.reply_queue, timeout=30)
        await self.client.start()

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        await self.client.call("echo", self.payload, returns=bytes)

    async def stop(self) -> None:
        await self.client.close()
        await self.broker.close()

    async def server_product(self) -> tuple[str, str]:
        return self.broker.server_product


class AmqpkitReplyQueueClient(AmqpkitRpcClient):
    reply_queue = "exclusive"


class AmqpkitOnewayPublisher(ClientSide):
    confirmed = False

    async def start(self) -> None:
        self.broker = Broker(BrokerSettings(url=self.url))
        await self.broker.connect()
        self.publisher = Publisher(
            self.broker, Exchange(""), BytesCodec(), confirm=self.confirmed, persistent=self.confirmed
        )

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        headers: dict[str, Any] = {SEND_TIME: sent_ns}
        if warmup:
            headers[WARMUP] = True
        await self.publisher.publish(self.payload, routing_key=self.queue, headers=headers)

    async def stop(self) -> None:
        await self.broker.close()

    async def server_product(self) -> tuple[str, str]:
        return self.broker.server_product


class AmqpkitConfirmedPublisher(AmqpkitOnewayPublisher):
    confirmed = True


class RawRpcClient(ClientSide):
    async def start(self) -> None:
        self.conn = await aiormq.connect(self.url)
        self.channel: AbstractChannel = await self.conn.channel(publisher_confirms=False)
        self.pending: dict[str, asyncio.Future[bytes]] = {}
        self.ids = itertools.count()
        self.prefix = uuid.uuid4().hex[:12]

        async def on_reply(message: DeliveredMessage) -> None:
            future = self.pending.pop(message.header.properties.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(message.body)

        await self.channel.basic_consume("amq.rabbitmq.reply-to", on_reply, no_ack=True)

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        cid = f"{self.prefix}.{next(self.ids)}"
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[cid] = future
        try:
            await self.channel.basic_publish(
                self.payload,
                routing_key=self.queue,
                properties=Basic.Properties(correlation_id=cid, reply_to="amq.rabbitmq.reply-to"),
            )
            async with asyncio.timeout(30):
                await future
        finally:
            self.pending.pop(cid, None)

    async def stop(self) -> None:
        await self.conn.close()

    async def server_product(self) -> tuple[str, str]:
        props = self.conn.server_properties
        return str(props.get("product", "")), str(props.get("version", ""))


class RawOnewayPublisher(ClientSide):
    async def start(self) -> None:
        self.conn = await aiormq.connect(self.url)
        self.channel = await self.conn.channel(publisher_confirms=False)

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        headers: dict[str, Any] = {SEND_TIME: sent_ns}
        if warmup:
            headers[WARMUP] = True
        await self.channel.basic_publish(
            self.payload, routing_key=self.queue, properties=Basic.Properties(headers=headers, delivery_mode=1)
        )

    async def stop(self) -> None:
        await self.conn.close()

    async def server_product(self) -> tuple[str, str]:
        props = self.conn.server_properties
        return str(props.get("product", "")), str(props.get("version", ""))


class AiopikaRpcClient(ClientSide):
    async def start(self) -> None:
        import aio_pika
        from aio_pika.patterns import JsonRPC

        self.conn = await aio_pika.connect(self.url)
        self.channel = await self.conn.channel()
        self.rpc = await JsonRPC.create(self.channel)
        self.data = self.payload.decode()

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        await asyncio.wait_for(self.rpc.call(self.queue, kwargs={"data": self.data}), 30)

    async def stop(self) -> None:
        await self.rpc.close()
        await self.conn.close()


class AmqpkitWorkQueueProducer(ClientSide):
    async def start(self) -> None:
        self.broker = Broker(BrokerSettings(url=self.url))
        await self.broker.connect()
        self.work: WorkQueue[bytes] = WorkQueue(self.broker, self.queue, BytesCodec())

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        headers: dict[str, Any] = {SEND_TIME: sent_ns}
        if warmup:
            headers[WARMUP] = True
        await self.work.enqueue(self.payload, headers=headers)

    async def stop(self) -> None:
        await self.broker.close()

    async def server_product(self) -> tuple[str, str]:
        return self.broker.server_product


class AiopikaProducer(ClientSide):
    """Bare aio-pika: persistent messages on a channel with publisher confirms."""

    async def start(self) -> None:
        import aio_pika

        self.conn = await aio_pika.connect(self.url)
        self.channel = await self.conn.channel(publisher_confirms=True)
        self.exchange = self.channel.default_exchange

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        import aio_pika

        headers: dict[str, Any] = {SEND_TIME: sent_ns}
        if warmup:
            headers[WARMUP] = True
        message = aio_pika.Message(self.payload, headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self.exchange.publish(message, routing_key=self.queue)

    async def stop(self) -> None:
        await self.conn.close()


CLIENTS: dict[str, type[ClientSide]] = {
    "rpc": AmqpkitRpcClient,
    "rpc-reply-queue": AmqpkitReplyQueueClient,
    "oneway": AmqpkitOnewayPublisher,
    "oneway-confirmed": AmqpkitConfirmedPublisher,
    "raw-rpc": RawRpcClient,
    "raw-oneway": RawOnewayPublisher,
    "aiopika-rpc": AiopikaRpcClient,
    "workqueue": AmqpkitWorkQueueProducer,
    "aiopika-workqueue": AiopikaProducer,
}

SCENARIOS = tuple(CLIENTS)
