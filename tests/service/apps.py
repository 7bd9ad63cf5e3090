"""Services that `amqpkit run` is pointed at in the CLI tests (names from SVC_PREFIX, so each test has its own)."""

from __future__ import annotations

import os

from pydantic import BaseModel

from amqpkit import Exchange
from amqpkit.service import Service

from .. import long_task_handlers

PREFIX = os.environ.get("SVC_PREFIX", "svc")


class Job(BaseModel):
    n: int


not_a_service = object()

# Two handlers on one queue, with different specs.
conflicting = Service("conflicting")


@conflicting.subscriber(Exchange(f"{PREFIX}.x", type="topic"), binding_keys=["a"], queue=f"{PREFIX}.q")
async def listen(job: Job) -> None: ...


@conflicting.worker(f"{PREFIX}.q")
async def work(job: Job) -> None: ...


# An annotation that names nothing.
unresolvable = Service("unresolvable")


@unresolvable.worker(f"{PREFIX}.jobs")
async def handle(job: Jbo) -> None: ...  # type: ignore[name-defined]  # noqa: F821


# A worker whose queue a test replaces under it.
workers = Service("workers")


@workers.worker(f"{PREFIX}.jobs")
async def run_job(job: Job) -> None:
    print(f"done {job.n}", flush=True)


# A CPU-bound worker on the process executor (a module-level handler), with a queue-level consumer_timeout.
cpu = Service("cpu")
cpu.worker(
    f"{PREFIX}.cpu", concurrency=2, executor="process", processes=2, consumer_timeout=7200
)(long_task_handlers.crunch)  # fmt: skip
