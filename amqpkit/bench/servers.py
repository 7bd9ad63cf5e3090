"""The serving sides of the AMQP scenarios: amqpkit's, bare aiormq's and aio-pika's."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from ..codec import BytesCodec
from ..connection import Broker
from ..executors import ExecutorKind, ProcessRunner
from ..message import Delivery, Settlement
from ..patterns.pubsub import Subscriber
from ..patterns.rpc import RpcServer
from ..patterns.work_queue import Worker, WorkQueue
from ..settings import BrokerSettings
from ..topology import Exchange, Queue, QueueType
from .base import ServerSide

__all__ = [
    "AiopikaConsumer", "AiopikaRpcServer", "AmqpkitConfirmedConsumer", "AmqpkitOnewayConsumer", "AmqpkitRpcServer",
    "AmqpkitWorkQueueWorker", "ProcessWorkQueueWorker", "RawOnewayConsumer", "RawRpcServer", "RawRpcWireServer",
    "SyncWorkQueueWorker",
    "spin", "task",
]  # fmt: skip


class AmqpkitRpcServer(ServerSide):
    async def start(self) -> None:
        self.broker = Broker(BrokerSettings(url=self.options.url))
        await self.broker.connect()
        self.server = RpcServer(
            self.broker, Queue(self.options.queue, auto_delete=True), concurrency=self.options.prefetch
        )

        async def echo(body: bytes) -> bytes:
            await self.work()
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
        queue = Queue(self.options.queue, type=queue_type)  # durable: RabbitMQ 4.x deprecates transient shared queues
        await self.broker.declare_queue(queue)

        async def handler(delivery: Delivery[bytes]) -> None:
            await self.work()
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
    @staticmethod
    def reply_properties(cid: str | None) -> Basic.Properties:
        """The fewest a reply needs: what the caller matches it by."""
        return Basic.Properties(correlation_id=cid)

    async def start(self) -> None:
        self.conn = await aiormq.connect(self.options.url)
        self.channel = await self.conn.channel(publisher_confirms=False)
        await self.channel.queue_declare(self.options.queue, durable=True, auto_delete=True)
        await self.channel.basic_qos(prefetch_count=self.options.prefetch)
        channel = self.channel
        reply_properties = self.reply_properties

        async def on_request(message: DeliveredMessage) -> None:
            await self.work()
            props = message.header.properties
            reply = reply_properties(props.correlation_id)
            await channel.basic_publish(message.body, routing_key=props.reply_to or "", properties=reply)
            await channel.basic_ack(message.delivery_tag or 0)
            self.received += 1

        await self.channel.basic_consume(self.options.queue, on_request)

    async def stop(self) -> None:
        await self.conn.close()


class RawRpcWireServer(RawRpcServer):
    @staticmethod
    def reply_properties(cid: str | None) -> Basic.Properties:
        """The reply amqpkit's RpcServer sends: a content type, and the correlation id as message id."""
        return Basic.Properties(content_type="application/octet-stream", correlation_id=cid, message_id=cid)


class RawOnewayConsumer(ServerSide):
    async def start(self) -> None:
        self.conn = await aiormq.connect(self.options.url)
        self.channel = await self.conn.channel(publisher_confirms=False)
        # classic, as amqpkit's one-way consumer declares it: not whatever a vhost's default queue type makes it
        await self.channel.queue_declare(self.options.queue, durable=True, arguments={"x-queue-type": "classic"})
        await self.channel.basic_qos(prefetch_count=self.options.prefetch)

        async def on_message(message: DeliveredMessage) -> None:
            await self.work()
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
        # Its reply queue exclusive: RabbitMQ 4.x deprecates transient non-exclusive queues.
        self.rpc = await JsonRPC.create(self.channel, exclusive=True)

        async def echo(*, data: str) -> str:
            await self.work()
            self.received += 1
            return data

        await self.rpc.register(self.options.queue, echo, durable=True, auto_delete=True)

    async def stop(self) -> None:
        await self.rpc.close()
        await self.conn.close()


def spin(milliseconds: float) -> None:
    """Busy CPU work: ``milliseconds`` of this thread's own CPU time (time spent waiting for a core is not counted)."""
    if milliseconds <= 0:
        return
    end = time.thread_time() + milliseconds / 1000
    while time.thread_time() < end:
        pass


def task(body: bytes, *, cpu_ms: float = 0.0, wait_ms: float = 0.0) -> None:
    """The work-queue task as a plain ``def``: ``cpu_ms`` of CPU, then ``wait_ms`` blocked (a database call).

    Module-level, so that a process pool can import it by name (``executor="process"``).
    """
    spin(cpu_ms)
    if wait_ms > 0:
        time.sleep(wait_ms / 1000)


class _MeasuredWorker(Worker[bytes]):
    """A Worker that tells the bench of every task it completed, after the handler returned and the ack went out.

    The same point for every handler variant: an ``async def``'s, a thread's and a process's return
    all come back to the worker's own task on the event loop, which acks and counts.
    """

    side: ServerSide

    async def _on_task(self, raw: Delivery[bytes]) -> None:
        await super()._on_task(raw)
        if raw.settled is Settlement.ACKED:
            self.side.observe(raw.headers)


class AmqpkitWorkQueueWorker(ServerSide):
    """One worker process of the work queue (``--workers`` starts several), its handler an ``async def``.

    The handler spends ``task_cpu_ms`` of CPU on the event loop, then waits ``service_ms`` (awaited).
    """

    executor: ExecutorKind | None = None

    def handler(self) -> Callable[..., Any]:
        cpu_ms = self.options.task_cpu_ms

        async def handler(delivery: Delivery[bytes]) -> None:
            spin(cpu_ms)
            await self.work()

        return handler

    async def start(self) -> None:
        self.broker = Broker(BrokerSettings(url=self.options.url))
        await self.broker.connect()
        self.work_queue: WorkQueue[bytes] = WorkQueue(self.broker, self.options.queue, BytesCodec())
        self.worker = _MeasuredWorker(
            self.work_queue, self.handler(), concurrency=self.options.prefetch, executor=self.executor
        )
        self.worker.side = self
        await self.worker.start()
        await self.warm()

    async def warm(self) -> None:
        """Start every pool process now (each imports the handler's module), not during the first measured run."""
        runner = self.worker._handler.runner
        if isinstance(runner, ProcessRunner):
            futures = await asyncio.gather(*(runner.submit(task, b"", {}) for _ in range(runner.processes)))
            await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

    async def stop(self) -> None:
        await self.worker.stop(grace=5)
        for name in (self.work_queue.name, self.work_queue.dlq_name):
            with contextlib.suppress(Exception):  # another worker process may have deleted it
                await self.broker.delete_queue(name)
        await self.broker.close()


class SyncWorkQueueWorker(AmqpkitWorkQueueWorker):
    """The same work queue, its handler a plain ``def``: it runs in the worker's thread pool (one per task in flight).

    ``service_ms`` is a blocking wait in the thread.
    """

    def handler(self) -> Callable[..., Any]:
        return functools.partial(task, cpu_ms=self.options.task_cpu_ms, wait_ms=self.options.service_ms)


class ProcessWorkQueueWorker(SyncWorkQueueWorker):
    """The same ``def``, with ``executor="process"``: a pool of one process per CPU (amqpkit's default)."""

    executor = "process"


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
            await self.work()
            self.observe(message.headers)
            await message.ack()

        await self.queue.consume(on_message)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.queue.delete(if_unused=False, if_empty=False)
        await self.conn.close()
