"""Health endpoints for a running service: ``GET /healthz`` and ``GET /readyz``, for Kubernetes probes.

- ``/healthz``: 200 while the process runs (liveness).
- ``/readyz``: 200 while the service is ready (connected, every consumer
  attached), else 503; the body is JSON either way:
  ``{"status": "ready"}`` or ``{"status": "not ready", "reason": "..."}``.

A minimal HTTP/1.1 server on asyncio (one request per connection, then
close): probes need nothing more, and it keeps amqpkit free of a web
framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["HealthServer", "Readiness"]

log = logging.getLogger("amqpkit.health")

Readiness = Callable[[], tuple[bool, str | None]]

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT = 5.0


class HealthServer:
    """Serves ``/healthz`` and ``/readyz`` on ``host:port`` (port 0: any free port; see :attr:`port`)."""

    def __init__(self, readiness: Readiness, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.readiness = readiness
        self.host = host
        self.requested_port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start the health server first"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> HealthServer:
        self._server = await asyncio.start_server(self._serve, self.host, self.requested_port)
        log.info("health endpoints on http://%s:%d/healthz and /readyz", self.host, self.port)
        return self

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def __aenter__(self) -> HealthServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def answer(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        """The status and JSON body for a request."""
        path = path.split("?", 1)[0]
        if path not in ("/healthz", "/readyz"):
            return 404, {"status": "not found", "paths": ["/healthz", "/readyz"]}
        if method not in ("GET", "HEAD"):
            return 405, {"status": "method not allowed"}
        if path == "/healthz":
            return 200, {"status": "ok"}
        ready, reason = self.readiness()
        if ready:
            return 200, {"status": "ready"}
        return 503, {"status": "not ready", "reason": reason or "unknown"}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, doc = self.answer(method, path)
        except (ValueError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            method, status, doc = "GET", 400, {"status": "bad request"}
        except ConnectionError:
            writer.close()
            return
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}.get(
            status, "Service Unavailable"
        )
        body = json.dumps(doc).encode()
        head_out = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head_out.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
