"""Services whose start fails in the service's own code (what `amqpkit run` must say in one line)."""

from __future__ import annotations

import os

from amqpkit.service import Service

PREFIX = os.environ.get("SVC_PREFIX", "svc")

# A startup hook that fails (a dependency not there yet).
hook_fails = Service("hook-fails")


@hook_fails.on_startup
async def connect_cache() -> None:
    raise ConnectionRefusedError("cache at 127.0.0.1:1 refused the connection")


@hook_fails.worker(f"{PREFIX}.jobs")
async def job(n: int) -> None: ...
