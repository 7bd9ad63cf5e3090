"""A TCP proxy between client and broker that injects faults.

- ``cut()``: close every connection now (both sides see a reset/EOF);
- ``stall()`` / ``resume()``: stop forwarding bytes on open connections
  without closing them (new connections are forwarded normally);
- ``latency``: seconds added to every chunk forwarded;
- ``reset_after(n)``: the next connection is reset after ``n`` bytes from the client;
- ``refusing = True``: new connections are reset at once (hold the client out while the test changes things).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any
from urllib.parse import urlsplit

from amqpkit import BrokerSettings, ReconnectPolicy

from ..brokerctl import session_vhost, with_vhost


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.latency = 0.0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._stalled: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._reset_after: int | None = None
        self.refusing = False  # True: every new connection is reset at once (the broker "is down")
        self._abandoned: set[asyncio.StreamWriter] = set()  # broker sides left open by abandon(), closed by close()
        self.accepted = 0  # connections accepted, refused ones included
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, user: str, password: str, vhost: str | None = None) -> str:
        """An AMQP URL through the proxy; into the test session's own vhost unless ``vhost`` is given."""
        return with_vhost(f"amqp://{user}:{password}@127.0.0.1:{self.port}/", vhost or session_vhost() or "/")

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.cut()
        for upstream in self._abandoned:
            _reset(upstream)
        self._abandoned.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def cut(self) -> int:
        """Reset every open connection; returns how many there were."""
        pairs = list(self._pairs)
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)
        self._pairs.clear()
        self._stalled.clear()
        self.cuts += 1
        return len(pairs)

    def stall(self) -> None:
        """Forward nothing more on the connections open now (they stay open)."""
        self._stalled |= self._pairs

    def resume(self) -> None:
        self._stalled.clear()

    def abandon(self) -> int:
        """Reset the client's side of every open connection and leave the broker's open and silent, as a link
        that died on the client's side only: the broker counts the connection until its heartbeat runs out."""
        pairs = list(self._pairs)
        for client, upstream in pairs:
            self._abandoned.add(upstream)
            _reset(client)
        return len(pairs)

    def reset_after(self, nbytes: int) -> None:
        self._reset_after = nbytes

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refusing:
            _reset(client_writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_writer)
            return
        pair = (client_writer, up_writer)
        self._pairs.add(pair)
        limit, self._reset_after = self._reset_after, None
        for coro in (
            self._pump(client_reader, up_writer, pair, limit),
            self._pump(up_reader, client_writer, pair, None),
        ):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        limit: int | None,
    ) -> None:
        sent = 0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                while pair in self._stalled:
                    await asyncio.sleep(0.05)
                if pair not in self._pairs:
                    break
                if self.latency:
                    await asyncio.sleep(self.latency)
                if limit is not None and sent + len(data) >= limit:
                    writer.write(data[: max(0, limit - sent)])
                    for side in pair:
                        _reset(side)
                    self._pairs.discard(pair)
                    break
                sent += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._pairs.discard(pair)
            self._stalled.discard(pair)
            if writer not in self._abandoned:
                with contextlib.suppress(Exception):
                    writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: what a dropped link or a crashed peer looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()


async def hold_out(proxy: FaultProxy, broker: Any) -> None:
    """Cut the client's connection and refuse new ones until :func:`let_in` (the broker "is down" for it)."""
    proxy.refusing = True
    proxy.cut()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while broker.is_connected:
        assert loop.time() < deadline, "the client did not notice the cut within 10 s"
        await asyncio.sleep(0.01)


async def bounce(proxy: FaultProxy, broker: Any, timeout: float = 30) -> None:
    """Cut the client's connection and wait until it has reconnected.

    Counted by ``broker.reconnects``, not by watching ``is_connected`` go false:
    the first reconnect attempt is immediate, so the client can be back before
    a poll ever sees it gone.
    """
    before = broker.reconnects
    assert proxy.cut(), "the client had no connection through the proxy to cut"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while broker.reconnects == before:
        assert loop.time() < deadline, f"the client did not reconnect within {timeout} s"
        await asyncio.sleep(0.01)
    await broker.wait_connected(timeout)


async def let_in(proxy: FaultProxy, broker: Any) -> None:
    proxy.refusing = False
    await broker.wait_connected(30)


PROXIED_HEARTBEAT = 2  # seconds: a dead connection is noticed within about two of them


def proxied_url(proxy: FaultProxy, amqp_url: str) -> str:
    """``amqp_url``'s user and vhost, reached through ``proxy``."""
    parts = urlsplit(amqp_url)
    return proxy.url(parts.username or "guest", parts.password or "guest")


def proxied_settings(
    proxy: FaultProxy, amqp_url: str, *, reconnect: ReconnectPolicy | None = None, **overrides: Any
) -> BrokerSettings:
    """Settings through ``proxy`` for fault tests: a 2 s heartbeat, short timeouts and fast reconnects."""
    options: dict[str, Any] = {"heartbeat": PROXIED_HEARTBEAT, "connect_timeout": 5, "publish_timeout": 10, **overrides}
    policy = reconnect or ReconnectPolicy(initial_delay=0.05, max_delay=1.0, jitter=0.1, connect_attempts=3)
    return BrokerSettings(url=proxied_url(proxy, amqp_url), reconnect=policy, **options)
