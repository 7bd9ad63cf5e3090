"""The task handler the soak's worker processes run: ``amqpkit worker soak.task_handler:handle``.

Each task carries its plan, drawn by the soak when it enqueued it: succeed,
fail ``fail_times`` times and then succeed, fail on every attempt, or be
rejected. The handler writes one JSON line per attempt to the journal named
by ``SOAK_JOURNAL`` (append, line-buffered: a SIGKILL loses at most the line
being written), so the soak's ledger knows which tasks completed, from
outside the broker. A completion is written before the handler returns, so a
worker killed between the line and the ack runs the task again: a duplicate,
which the ledger counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import IO

from pydantic import BaseModel

from amqpkit import Delivery, Reject

# The worker logs which task each delay-queue lease renewal took and handed back (a DEBUG record): a retry that
# goes missing can then be matched against the renewals that touched it.
logging.getLogger("amqpkit.worker.lease").setLevel(logging.DEBUG)


class SoakTask(BaseModel):
    id: str
    fail_times: int = 0
    fatal: str | None = None  # "fail": fails every attempt; "reject": raises Reject
    work_ms: int = 20


_journal: IO[str] | None = None


def _write(record: dict[str, object]) -> None:
    global _journal
    if _journal is None:
        path = os.environ.get("SOAK_JOURNAL") or f"soak-journal-{os.getpid()}.jsonl"
        _journal = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the life of the process
    _journal.write(json.dumps(record, separators=(",", ":")) + "\n")


async def handle(delivery: Delivery[SoakTask]) -> None:
    task = delivery.value
    attempt = int(delivery.headers.get("x-attempt", 1))
    record: dict[str, object] = {"id": task.id, "attempt": attempt, "pid": os.getpid()}
    await asyncio.sleep(task.work_ms / 1000)
    if task.fatal == "reject":
        _write({**record, "outcome": "reject", "t": time.time()})
        raise Reject(f"task {task.id} is rejected by plan")
    if task.fatal == "fail" or attempt <= task.fail_times:
        _write({**record, "outcome": "fail", "t": time.time()})
        raise RuntimeError(f"task {task.id} fails on attempt {attempt} by plan")
    _write({**record, "outcome": "done", "t": time.time()})
