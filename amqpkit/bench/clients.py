"""The driving sides of the AMQP scenarios: amqpkit's, bare aiormq's and aio-pika's."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

from ..codec import BytesCodec
from ..connection import Broker
from ..patterns.pubsub import Publisher
from ..patterns.rpc import RpcClient
from ..patterns.work_queue import WorkQueue
from ..settings import BrokerSettings
from ..topology import Exchange
from .base import ClientSide

__all__ = [
    "AiopikaProducer", "AiopikaRpcClient", "AmqpkitConfirmedPublisher", "AmqpkitOnewayPublisher", "AmqpkitRpcClient",
    "AmqpkitReplyQueueClient", "AmqpkitWorkQueueProducer", "RawOnewayPublisher", "RawRpcClient",
    "RawRpcWireClient",
]  # fmt: skip


class AmqpkitRpcClient(ClientSide):
    reply_queue: Any = "direct"

    async def start(self) -> None:
        self.broker = Broker(BrokerSettings(url=self.url))
        await self.broker.connect()
        self.client = RpcClient(
            self.broker, self.queue, codec=BytesCodec(), reply_queue=self.reply_queue, timeout=self.options.deadline
        )
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
        await self.publisher.publish(self.payload, routing_key=self.queue, headers=self.headers(sent_ns, warmup))

    async def stop(self) -> None:
        await self.broker.close()

    async def server_product(self) -> tuple[str, str]:
        return self.broker.server_product

    def watched_queues(self) -> tuple[str, ...]:
        return (self.queue,)


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

    #: Send mandatory, as amqpkit's RpcClient does (the wire variant below).
    mandatory = False

    def request_properties(self, cid: str) -> Basic.Properties:
        """The fewest a call needs: where to reply, and what to match the reply by."""
        return Basic.Properties(correlation_id=cid, reply_to="amq.rabbitmq.reply-to")

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        cid = f"{self.prefix}.{next(self.ids)}"
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[cid] = future
        try:
            await self.channel.basic_publish(
                self.payload, routing_key=self.queue, properties=self.request_properties(cid), mandatory=self.mandatory
            )
            async with asyncio.timeout(self.options.deadline):
                await future
        except TimeoutError:
            if not future.done() or future.cancelled():
                raise
            future.result()  # the reply came in the loop turn the deadline fired in: heard in time
        finally:
            self.pending.pop(cid, None)

    async def stop(self) -> None:
        await self.conn.close()

    async def server_product(self) -> tuple[str, str]:
        props = self.conn.server_properties
        return str(props.get("product", "")), str(props.get("version", ""))


class RawRpcWireClient(RawRpcClient):
    """Bare aiormq sending the request amqpkit's RpcClient sends: method name, content type, message id, the
    deadline as expiration and as the ``x-timeout-ms`` header, mandatory. Beside ``raw-rpc`` it prices those
    properties; beside ``rpc`` it leaves amqpkit's own code as the difference."""

    mandatory = True

    def request_properties(self, cid: str) -> Basic.Properties:
        left_ms = max(1, int(self.options.deadline * 1000))
        return Basic.Properties(
            content_type="application/octet-stream", correlation_id=cid, message_type="echo",
            headers={"x-timeout-ms": left_ms}, message_id=cid, reply_to="amq.rabbitmq.reply-to",
            expiration=str(left_ms),
        )  # fmt: skip


class RawOnewayPublisher(ClientSide):
    async def start(self) -> None:
        self.conn = await aiormq.connect(self.url)
        self.channel = await self.conn.channel(publisher_confirms=False)

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        await self.channel.basic_publish(
            self.payload,
            routing_key=self.queue,
            properties=Basic.Properties(headers=self.headers(sent_ns, warmup), delivery_mode=1),
        )

    async def stop(self) -> None:
        await self.conn.close()

    async def server_product(self) -> tuple[str, str]:
        props = self.conn.server_properties
        return str(props.get("product", "")), str(props.get("version", ""))

    def watched_queues(self) -> tuple[str, ...]:
        return (self.queue,)


class AiopikaRpcClient(ClientSide):
    async def start(self) -> None:
        import aio_pika
        from aio_pika.patterns import JsonRPC

        self.conn = await aio_pika.connect(self.url)
        self.channel = await self.conn.channel()
        # Its reply queue exclusive: RabbitMQ 4.x deprecates transient non-exclusive queues.
        self.rpc = await JsonRPC.create(self.channel, exclusive=True)
        self.data = self.payload.decode()

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        await asyncio.wait_for(self.rpc.call(self.queue, kwargs={"data": self.data}), self.options.deadline)

    async def stop(self) -> None:
        await self.rpc.close()
        await self.conn.close()


class AmqpkitWorkQueueProducer(ClientSide):
    async def start(self) -> None:
        self.broker = Broker(BrokerSettings(url=self.url))
        await self.broker.connect()
        self.work: WorkQueue[bytes] = WorkQueue(self.broker, self.queue, BytesCodec())

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        await self.work.enqueue(self.payload, headers=self.headers(sent_ns, warmup))

    async def stop(self) -> None:
        await self.broker.close()

    async def server_product(self) -> tuple[str, str]:
        return self.broker.server_product

    def watched_queues(self) -> tuple[str, ...]:
        return (self.work.name,)


class AiopikaProducer(ClientSide):
    """Bare aio-pika: persistent messages on a channel with publisher confirms."""

    async def start(self) -> None:
        import aio_pika

        self.conn = await aio_pika.connect(self.url)
        self.channel = await self.conn.channel(publisher_confirms=True)
        self.exchange = self.channel.default_exchange

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        import aio_pika

        message = aio_pika.Message(
            self.payload, headers=self.headers(sent_ns, warmup), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await self.exchange.publish(message, routing_key=self.queue)

    async def stop(self) -> None:
        await self.conn.close()

    def watched_queues(self) -> tuple[str, ...]:
        return (self.queue,)
