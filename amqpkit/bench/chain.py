"""A chain of services: a request from A needs B, then C, then D.

Each of B, C and D runs in a process of its own (``--role b|c|d``); A is the
driver. Every service spends ``service_ms`` on its own work, ``prefetch``
requests at once.

- ``chain-rpc``: A calls B, B calls C, C calls D, each over amqpkit RPC. A
  service keeps its place (one of ``prefetch``, the RPC server's concurrency)
  while it waits for the next one: the caller's resources are held down the chain.
- ``chain-http``: the same calls over HTTP (uvicorn + Starlette servers,
  aiohttp clients, the faster of the two HTTP clients measured), with the
  same ``prefetch`` places per service, held the same way.
- ``chain-events``: A publishes ``requested``; B reacts and publishes
  ``b.done``, C reacts to that and publishes ``c.done``, D reacts and
  publishes ``d.done``, which A hears: then the request is complete. A
  service holds its place only for its own work. Events are transient and
  unconfirmed, like RPC's requests and replies; each service acks after it
  published its event, with ``prefetch`` unacked.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

from ..codec import BytesCodec
from ..connection import Broker
from ..message import Delivery
from ..patterns.pubsub import Publisher, Subscriber
from ..patterns.rpc import RpcClient, RpcServer
from ..settings import BrokerSettings
from ..topology import Exchange, ExchangeType, Queue
from .base import ClientSide, ServerSide
from .peers import AiohttpClient, UvicornApp

__all__ = [
    "ROLES", "ChainEventsClient", "ChainEventsService", "ChainHttpClient", "ChainHttpService", "ChainRpcClient",
    "ChainRpcService",
]  # fmt: skip

ROLES = ("d", "c", "b")  # started in this order, so that each service's next one is up first
NEXT = {"b": "c", "c": "d", "d": ""}
LISTENS = {"b": "requested", "c": "b.done", "d": "c.done"}
CORRELATION = "x-chain-id"


def _exchange(base: str) -> Exchange:
    return Exchange(base, type=ExchangeType.TOPIC, durable=False)


class ChainRpcService(ServerSide):
    async def start(self) -> None:
        o = self.options
        self.broker = Broker(BrokerSettings(url=o.url))
        await self.broker.connect()
        following = NEXT[o.role]
        self.client: RpcClient | None = None
        if following:
            self.client = RpcClient(self.broker, f"{o.queue}.{following}", codec=BytesCodec(), timeout=o.deadline)
            await self.client.start()
        client = self.client

        async def handle(body: bytes) -> bytes:
            await self.work(in_slot=True)  # the RPC server's concurrency is the slot
            if client is not None:
                body = await client.call("step", body, returns=bytes)
            self.received += 1
            return body

        self.server = RpcServer(self.broker, Queue(f"{o.queue}.{o.role}", auto_delete=True), concurrency=o.prefetch)
        self.server.add("step", handle, codec=BytesCodec())
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()
        if self.client is not None:
            await self.client.close()
        await self.broker.close()


class ChainRpcClient(ClientSide):
    async def start(self) -> None:
        self.broker = Broker(BrokerSettings(url=self.url))
        await self.broker.connect()
        self.client = RpcClient(self.broker, f"{self.queue}.b", codec=BytesCodec(), timeout=self.options.deadline)
        await self.client.start()

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        await self.client.call("step", self.payload, returns=bytes)

    async def stop(self) -> None:
        await self.client.close()
        await self.broker.close()

    async def server_product(self) -> tuple[str, str]:
        return self.broker.server_product


class ChainEventsService(ServerSide):
    async def start(self) -> None:
        o = self.options
        self.broker = Broker(BrokerSettings(url=o.url))
        await self.broker.connect()
        exchange = _exchange(o.queue)
        self.publisher: Publisher[bytes] = Publisher(
            self.broker, exchange, BytesCodec(), persistent=False, confirm=False
        )
        await self.publisher.declare()
        done_key = f"{o.role}.done"

        async def react(delivery: Delivery[bytes]) -> None:
            await self.work()
            await self.publisher.publish(delivery.body, routing_key=done_key, headers=delivery.headers)
            self.received += 1

        self.queue = Queue(f"{o.queue}.{o.role}")
        self.subscriber: Subscriber[bytes] = Subscriber(
            self.broker, exchange, react, binding_keys=[LISTENS[o.role]], queue=self.queue, prefetch=o.prefetch
        )
        await self.subscriber.start()

    async def stop(self) -> None:
        await self.subscriber.stop()
        await self.broker.delete_queue(self.queue)
        await self.broker.close()


class ChainEventsClient(ClientSide):
    """A: publishes ``requested`` and waits to hear ``d.done`` for the same id."""

    async def start(self) -> None:
        self.broker = Broker(BrokerSettings(url=self.url))
        await self.broker.connect()
        self.exchange = _exchange(self.queue)
        self.publisher: Publisher[bytes] = Publisher(
            self.broker, self.exchange, BytesCodec(), persistent=False, confirm=False
        )
        await self.publisher.declare()
        self.pending: dict[str, asyncio.Future[None]] = {}
        self.ids = itertools.count()
        self.prefix = os.urandom(6).hex()
        self.late = 0

        async def told(delivery: Delivery[bytes]) -> None:
            future = self.pending.pop(str(delivery.headers.get(CORRELATION, "")), None)
            if future is None or future.done():
                self.late += 1
                return
            future.set_result(None)

        self.done_queue = Queue(f"{self.queue}.a")
        self.subscriber: Subscriber[bytes] = Subscriber(
            self.broker, self.exchange, told, binding_keys=["d.done"], queue=self.done_queue, prefetch=1024,
            auto_ack=True,
        )  # fmt: skip
        await self.subscriber.start()

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        cid = f"{self.prefix}.{next(self.ids)}"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending[cid] = future
        try:
            await self.publisher.publish(self.payload, routing_key="requested", headers={CORRELATION: cid})
            async with asyncio.timeout(self.options.deadline):
                await future
        finally:
            self.pending.pop(cid, None)

    async def stop(self) -> None:
        await self.subscriber.stop()
        await self.broker.delete_queue(self.done_queue)
        await self.broker.delete_exchange(self.exchange.name)
        await self.broker.close()

    async def server_product(self) -> tuple[str, str]:
        return self.broker.server_product

    def watched_queues(self) -> tuple[str, ...]:
        return tuple(f"{self.queue}.{role}" for role in ("b", "c", "d"))


class ChainHttpService(ServerSide):
    async def start(self) -> None:
        import aiohttp
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        o = self.options
        self.session: Any = None
        following = f"http://{o.next_endpoint}/echo" if o.next_endpoint else ""
        if following:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=o.deadline)
            )
        session = self.session

        async def step(request: Request) -> Response:
            body = await request.body()
            async with self.slot():  # held while the next service works, as chain-rpc's is
                await self.work(in_slot=True)
                if session is not None:
                    try:
                        async with session.post(following, data=body) as response:
                            body = await response.read()
                            if response.status != 200:
                                return Response(body, status_code=502)
                    except TimeoutError:
                        return Response(b"the next service did not answer in time", status_code=504)
                    except aiohttp.ClientError as exc:
                        return Response(f"the next service failed: {exc}".encode(), status_code=502)
            self.received += 1
            return Response(body, media_type="application/octet-stream")

        self.app = UvicornApp(Starlette(routes=[Route("/echo", step, methods=["POST"])]))
        await self.app.start()

    @property
    def endpoint(self) -> str:
        return self.app.endpoint

    async def stop(self) -> None:
        await self.app.stop()
        if self.session is not None:
            await self.session.close()


class ChainHttpClient(AiohttpClient):
    """A: aiohttp's client (the faster of the two) posting to B."""
