"""A service whose plain-def worker handler hangs (a blocking call that never returns), for the SIGTERM test."""

from __future__ import annotations

import os
import time

from amqpkit.service import Service

PREFIX = os.environ.get("SVC_PREFIX", "svc")

hangs = Service("hangs")


@hangs.worker(f"{PREFIX}.jobs")
def stuck(job: dict) -> None:  # type: ignore[type-arg]
    print("handler started", flush=True)
    time.sleep(3600)  # a blocking call that does not return: a hung socket read, a lock


slow_start = Service("slow_start")


@slow_start.on_startup
async def wait_for_a_database() -> None:
    import asyncio

    print("startup hook waiting", flush=True)
    await asyncio.sleep(60)  # a database not up yet, tried again and again


@slow_start.worker(f"{PREFIX}.jobs")
async def job(job: dict) -> None:  # type: ignore[type-arg]
    print("task ran", flush=True)
