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

The caller's deadline goes down the chain, so that no service works on a
request nobody waits for any more. Each hop carries the time left as a
relative budget in milliseconds (``x-timeout-ms``, as amqpkit's RPC does:
no clock is shared), which the receiving service counts from when the
request reached it; a service ends its part when the budget runs out,
waiting for its place included, and calls or tells the next one only with
time left, passing on what is left. It cannot see how long the request
waited in its broker queue before that: the request's expiration, which the
broker enforces there, bounds that wait. :attr:`Hop.expired` counts the
requests a service ended or skipped that way.

- ``chain-rpc``: amqpkit's RpcClient stamps the header (and the request's
  expiration) on every call; each service calls the next one with the time
  it has left, and ends with an error reply once it is gone.
- ``chain-http``: the same header on every POST; a service whose time is
  gone answers 504 without calling the next one, and A counts a 504 as a
  timeout.
- ``chain-events``: every event carries the header and expires with it in
  the next service's queue. A step whose time runs out publishes
  ``expired`` instead of its ``done`` event, and a service queue
  dead-letters an event that expired there to ``expired`` as well: A hears
  the fate of every request, answered or expired, and nothing is dropped
  unseen.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Mapping
from typing import Any

from ..codec import BytesCodec
from ..connection import Broker
from ..errors import RemoteError
from ..message import Delivery
from ..patterns.pubsub import Publisher, Subscriber
from ..patterns.rpc import TIMEOUT_HEADER, RpcClient, RpcServer
from ..settings import BrokerSettings
from ..topology import Exchange, ExchangeType, Queue
from .base import ClientSide, ServerOptions, ServerSide
from .peers import AiohttpClient, UvicornApp

__all__ = [
    "ROLES", "ChainEventsClient", "ChainEventsService", "ChainHttpClient", "ChainHttpService", "ChainRpcClient",
    "ChainRpcService", "DeadlinePassed", "Hop",
]  # fmt: skip

ROLES = ("d", "c", "b")  # started in this order, so that each service's next one is up first
NEXT = {"b": "c", "c": "d", "d": ""}
LISTENS = {"b": "requested", "c": "b.done", "d": "c.done"}
LAST_ROLE = "d"  # its `d.done` goes back to A
CORRELATION = "x-chain-id"
EXPIRED = "expired"  # the event chain: a request's time ran out before its last step (A binds it too)
EXPIRED_AT = "x-expired-at"  # the service it ran out in


def _exchange(base: str) -> Exchange:
    return Exchange(base, type=ExchangeType.TOPIC, durable=False)


class DeadlinePassed(TimeoutError):
    """The caller's deadline passed before the chain was done with its request."""


def _deadline(headers: Mapping[str, Any] | None) -> float | None:
    """The caller's deadline on this loop's clock: now plus the budget its request carries, if it says one."""
    value = headers.get(TIMEOUT_HEADER) if headers else None
    try:
        budget_ms = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return asyncio.get_running_loop().time() + budget_ms / 1000


def _left_ms(deadline: float) -> int:
    """Whole milliseconds left until ``deadline`` (0: none worth passing on)."""
    return max(0, int((deadline - asyncio.get_running_loop().time()) * 1000))


class Hop(ServerSide):
    """A service of a chain; :attr:`expired` counts the requests it ended or skipped at the caller's deadline."""

    def __init__(self, options: ServerOptions) -> None:
        super().__init__(options)
        self.expired = 0

    def reset(self, origin_ns: int | None = None) -> None:
        super().reset(origin_ns)
        self.expired = 0

    async def report(self, expected: int, timeout: float = 60.0) -> dict[str, Any]:
        doc = await super().report(expected, timeout)
        doc["expired"] = self.expired
        return doc


async def _call_next(client: RpcClient, body: bytes, timeout: float | None) -> bytes:
    """The next service's answer; its error reply saying that the caller's deadline passed is a timeout."""
    try:
        return await client.call("step", body, returns=bytes, timeout=timeout)
    except RemoteError as exc:
        if exc.remote_type == DeadlinePassed.__name__:
            raise DeadlinePassed(exc.remote_message) from None
        raise


class ChainRpcService(Hop):
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
        role = o.role

        async def handle(request: Delivery[bytes]) -> bytes:
            body = request.body
            deadline = _deadline(request.headers)
            try:
                async with asyncio.timeout_at(deadline):
                    await self.work(in_slot=True)  # the RPC server's concurrency is the slot
                # The call is timed by itself, with the time left: under a second timer for the same deadline, a
                # reply taken in the loop turn both fire in would be dropped (the outer one's cancel is not the
                # call's to read).
                if client is not None:
                    if deadline is None:
                        body = await client.call("step", body, returns=bytes)
                    elif (left_ms := _left_ms(deadline)) > 0:
                        body = await _call_next(client, body, left_ms / 1000)
                    else:
                        raise TimeoutError
            except DeadlinePassed:
                raise  # the next one ran out, and counted it: said on up the chain as it is
            except TimeoutError:  # the next one's RpcTimeout included: its timeout was the time left
                if deadline is None:
                    raise
                self.expired += 1
                raise DeadlinePassed(f"the caller's deadline passed in service {role}") from None
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
        await _call_next(self.client, self.payload, None)

    async def stop(self) -> None:
        await self.client.close()
        await self.broker.close()

    async def server_product(self) -> tuple[str, str]:
        return self.broker.server_product


class ChainEventsService(Hop):
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
        role = o.role

        async def react(delivery: Delivery[bytes]) -> None:
            deadline = _deadline(delivery.headers)
            if deadline is None:
                await self.work()
                await self.publisher.publish(delivery.body, routing_key=done_key, headers=delivery.headers)
                self.received += 1
                return
            headers = dict(delivery.headers)
            try:
                async with asyncio.timeout_at(deadline):
                    await self.work()
                left_ms = _left_ms(deadline)
            except TimeoutError:
                left_ms = 0
            if left_ms <= 0:  # A is told, not left to guess
                self.expired += 1
                headers[EXPIRED_AT] = role
                await self.publisher.publish(delivery.body, routing_key=EXPIRED, headers=headers)
                return
            headers[TIMEOUT_HEADER] = left_ms
            # Into the next service's queue it expires with the time left (dead-lettered to A as `expired`);
            # the last step's event goes to A, whose queue has no dead-letter route: it must not expire there.
            expiration = left_ms / 1000 if role != LAST_ROLE else None
            await self.publisher.publish(delivery.body, routing_key=done_key, headers=headers, expiration=expiration)
            self.received += 1

        # An event that expires while it waits here is dead-lettered to A as `expired`, not dropped unseen.
        self.queue = Queue(f"{o.queue}.{o.role}", dead_letter_exchange=exchange.name, dead_letter_routing_key=EXPIRED)
        self.subscriber: Subscriber[bytes] = Subscriber(
            self.broker, exchange, react, binding_keys=[LISTENS[o.role]], queue=self.queue, prefetch=o.prefetch
        )
        await self.subscriber.start()

    async def stop(self) -> None:
        await self.subscriber.stop()
        await self.broker.delete_queue(self.queue)
        await self.broker.close()


class ChainEventsClient(ClientSide):
    """A: publishes ``requested`` and waits to hear ``d.done`` for the same id, or that it expired.

    :attr:`expired` counts the requests a service said had run out of time (also those A gave up on first);
    :attr:`late` the ones done after A had given up on them; :attr:`unasked` answers for no request A is
    waiting for or gave up on (a duplicate).
    """

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
        self.unasked = 0
        self.expired = 0
        self.given_up: set[str] = set()  # requests A stopped waiting for, whose fate it has not heard yet

        async def told(delivery: Delivery[bytes]) -> None:
            cid = str(delivery.headers.get(CORRELATION, ""))
            expired_at = str(delivery.headers.get(EXPIRED_AT) or "a queue") if delivery.routing_key == EXPIRED else None
            self.heard(cid, expired_at)

        self.done_queue = Queue(f"{self.queue}.a")
        self.subscriber: Subscriber[bytes] = Subscriber(
            self.broker, self.exchange, told, binding_keys=["d.done", EXPIRED], queue=self.done_queue, prefetch=1024,
            auto_ack=True,
        )  # fmt: skip
        await self.subscriber.start()

    def heard(self, cid: str, expired_at: str | None) -> None:
        """The chain's word on request ``cid``: done, or (``expired_at`` the service, or "a queue") expired."""
        future = self.pending.pop(cid, None)
        # A gave up when its wait was cancelled, even if it has not run since to note that in given_up.
        given_up = cid in self.given_up or (future is not None and future.cancelled())
        self.given_up.discard(cid)
        if future is None and not given_up:  # a word on a request already ended and counted: a duplicate
            self.unasked += 1
            return
        if expired_at is not None:
            self.expired += 1
            if future is not None and not future.done():
                future.set_exception(DeadlinePassed(f"the deadline passed in {expired_at}"))
            return
        if given_up:
            self.late += 1
            return
        assert future is not None  # neither ended nor given up: A waits on it (only heard() and A's timeout end it)
        future.set_result(None)

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        cid = f"{self.prefix}.{next(self.ids)}"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending[cid] = future
        deadline = self.options.deadline
        headers = {CORRELATION: cid, TIMEOUT_HEADER: int(deadline * 1000)}
        try:
            await self.publisher.publish(self.payload, routing_key="requested", headers=headers, expiration=deadline)
            async with asyncio.timeout(deadline):
                await future
        except TimeoutError:
            if not future.done() or future.cancelled():
                # A stopped waiting: the chain may still say how this request ended, unless it already has
                # (heard() takes the request out of pending).
                if future.cancelled() and self.pending.get(cid) is future:
                    self.given_up.add(cid)
                raise
            # Told in the same loop turn as the deadline fired: the answer (or its expiry) was heard in time.
            future.result()
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


class ChainHttpService(Hop):
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
            deadline = _deadline(request.headers)
            body = await request.body()
            try:
                async with asyncio.timeout_at(deadline), self.slot():  # held while the next one works, as in chain-rpc
                    await self.work(in_slot=True)
                    if session is not None:
                        options: dict[str, Any] = {}
                        if deadline is not None:
                            left_ms = _left_ms(deadline)
                            if left_ms <= 0:
                                raise TimeoutError
                            options = {
                                "headers": {TIMEOUT_HEADER: str(left_ms)},
                                "timeout": aiohttp.ClientTimeout(total=left_ms / 1000),
                            }
                        try:
                            async with session.post(following, data=body, **options) as response:
                                body = await response.read()
                                if response.status == 504:
                                    return Response(body, status_code=504)  # counted where it ran out
                                if response.status != 200:
                                    return Response(body, status_code=502)
                        except aiohttp.ClientError as exc:
                            if isinstance(exc, TimeoutError):
                                raise
                            return Response(f"the next service failed: {exc}".encode(), status_code=502)
            except TimeoutError:
                if deadline is not None:
                    self.expired += 1
                return Response(b"the caller's deadline passed", status_code=504)
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
    """A: aiohttp's client (the faster of the two) posting to B, with its deadline as the time left.

    A 504 is the chain saying that A's deadline passed: a timeout, as A's own would be.
    """

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        headers = {TIMEOUT_HEADER: str(int(self.options.deadline * 1000))}
        async with self.session.post(self.url_, data=self.payload, headers=headers) as response:
            await response.read()
            if response.status == 504:
                raise DeadlinePassed("HTTP 504: the caller's deadline passed in the chain")
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
