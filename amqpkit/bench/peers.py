"""The peers: the same echo over HTTP/1.1 (uvicorn + Starlette) and over gRPC (grpcio's asyncio API).

The servers listen on 127.0.0.1 on a port the system picks, and say which in
their ``ready`` line. Their libraries come with the ``bench`` extra and are
imported only when a peer scenario starts.

- ``http-rpc``: ``POST /echo`` on uvicorn (httptools when installed) with a
  Starlette route, over kept-alive connections. Driven by two clients,
  aiohttp's and httpx's, which differ a great deal: both are measured.
- ``grpc-rpc``: a unary method with raw bytes in and out, served through a
  generic handler, so nothing is generated from a ``.proto`` file.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from .base import ClientSide, ServerSide

__all__ = ["AiohttpClient", "GrpcClient", "GrpcServer", "HttpServer", "HttpxClient", "listening_socket"]

GRPC_METHOD = "/amqpkit.bench.Echo/Echo"


def listening_socket() -> socket.socket:
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it
    # a response written in two parts waits for the client's delayed ACK (about 40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class UvicornApp:
    """A Starlette app served by uvicorn in this event loop, on a socket of its own."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = listening_socket()
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, log_level="warning", access_log=False,
            timeout_keep_alive=3600,  # the driver's connections stay open between runs
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while not self.server.started:  # uvicorn says so by a flag only
            if self.task.done():
                self.task.result()
                raise RuntimeError("uvicorn stopped while starting")
            if loop.time() > end:
                raise RuntimeError("uvicorn did not start within 30 s")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 10)
        self.sock.close()


class HttpServer(ServerSide):
    """``POST /echo`` answers with the request's body."""

    async def start(self) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        async def echo(request: Request) -> Response:
            body = await request.body()
            await self.work()
            self.received += 1
            return Response(body, media_type="application/octet-stream")

        self.app = UvicornApp(Starlette(routes=[Route("/echo", echo, methods=["POST"])]))
        await self.app.start()

    @property
    def endpoint(self) -> str:
        return self.app.endpoint

    async def stop(self) -> None:
        await self.app.stop()


class AiohttpClient(ClientSide):
    async def start(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=self.options.deadline)
        )
        self.url_ = f"http://{self.options.endpoint}/echo"

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        async with self.session.post(self.url_, data=self.payload) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")

    async def stop(self) -> None:
        await self.session.close()


class HttpxClient(ClientSide):
    async def start(self) -> None:
        import httpx

        self.httpx = httpx
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None), timeout=self.options.deadline
        )
        self.url_ = f"http://{self.options.endpoint}/echo"

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        try:
            response = await self.client.post(self.url_, content=self.payload)
        except self.httpx.TimeoutException as exc:
            raise TimeoutError(str(exc)) from exc
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")

    async def stop(self) -> None:
        await self.client.aclose()


class GrpcServer(ServerSide):
    """A unary ``Echo`` method, raw bytes both ways (no serializers: grpcio passes bytes through)."""

    async def start(self) -> None:
        import grpc  # type: ignore[import-untyped]

        async def echo(request: bytes, context: Any) -> bytes:
            await self.work()
            self.received += 1
            return request

        self.server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "amqpkit.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(grace=1)


class GrpcClient(ClientSide):
    async def start(self) -> None:
        import grpc

        self.grpc = grpc
        self.channel = grpc.aio.insecure_channel(self.options.endpoint)
        await asyncio.wait_for(self.channel.channel_ready(), 30)
        self.call = self.channel.unary_unary(GRPC_METHOD)

    async def operate(self, sent_ns: int, warmup: bool) -> None:
        try:
            await self.call(self.payload, timeout=self.options.deadline)
        except self.grpc.aio.AioRpcError as exc:
            if exc.code() == self.grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError("gRPC deadline exceeded") from exc
            raise

    async def stop(self) -> None:
        await self.channel.close()
