"""Task handlers that the work-queue tests run in worker processes (`amqpkit worker tests.worker_app:handle`)."""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel


class Job(BaseModel):
    n: int
    sleep: float = 0.0
    fail: bool = False


async def handle(job: Job) -> None:
    print(f"start {job.n} pid={os.getpid()}", flush=True)
    if job.sleep:
        await asyncio.sleep(job.sleep)
    if job.fail:
        raise RuntimeError(f"job {job.n} failed")
    print(f"done {job.n} pid={os.getpid()}", flush=True)
