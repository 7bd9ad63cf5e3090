"""Handlers the long-task tests run in pool processes (a module of their own, light to import in a child).

Each run appends a line to the file the job names, so a test counts runs
across processes without a broker round trip.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from amqpkit import TaskContext


def note_run(job: dict[str, Any], what: str = "run") -> None:
    with open(job["log"], "a") as f:
        f.write(f"{what} {job.get('n', 0)} pid={os.getpid()}\n")


def runs(log: str | Path, what: str = "run") -> list[str]:
    path = Path(log)
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.startswith(what + " ")]


def crunch(job: dict[str, Any]) -> int:
    """CPU-bound for ``job['seconds']`` of pure Python (holds the GIL all along); returns the loop count."""
    note_run(job)
    deadline = time.monotonic() + float(job["seconds"])
    count = 0
    while time.monotonic() < deadline:
        for i in range(10_000):
            count += i & 1
    note_run(job, "done")
    return count


def square(job: dict[str, Any]) -> int:
    note_run(job)
    return int(job["x"]) ** 2


def die_once(job: dict[str, Any]) -> str:
    """With ``how``, the first run kills its own process (as the OOM killer would); the next one completes."""
    marker = Path(job["log"] + ".died")
    note_run(job)
    if job.get("how") and not marker.exists():
        marker.write_text("x")
        if job.get("how") == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    time.sleep(float(job.get("seconds", 0)))
    note_run(job, "done")
    return "ok"


def sleep_then_done(job: dict[str, Any]) -> str:
    note_run(job)
    time.sleep(float(job["seconds"]))
    note_run(job, "done")
    return "ok"


def fails(job: dict[str, Any]) -> str:
    """Fails as the job says: 'error' (ValueError), 'reject', or 'retry-once' (Retry(delay=0.1), then completes)."""
    from amqpkit import Reject, Retry

    note_run(job)
    how = job["how"]
    if how == "error":
        raise ValueError(f"bad input {job.get('n', 0)}")
    if how == "reject":
        raise Reject("not for us")
    marker = Path(job["log"] + ".retried")
    if not marker.exists():
        marker.write_text("x")
        raise Retry("not yet", delay=0.1)
    note_run(job, "done")
    return "ok"


def report_progress(job: dict[str, Any], ctx: TaskContext) -> str:
    """Reports 0.5 then 1.0 from a pool process (or a thread)."""
    ctx.progress_nowait(0.5, "half way")
    ctx.progress_nowait(1.0, f"done {ctx.task_id}")
    return "ok"


def square_plain(job: dict[str, Any]) -> int:
    """A trivial task (no file written): for measuring what a pool process costs per task."""
    return int(job["x"]) ** 2


def square_here(x: int) -> dict[str, int]:
    """CPU-light RPC/subscriber handler: the square and the pid it ran in."""
    return {"square": x * x, "pid": os.getpid()}


def refuse_negative(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


def note_event(event: dict[str, Any]) -> None:
    """A subscriber handler: notes the event's n and its pid in the file the event names; fails on n < 0."""
    if int(event["n"]) < 0:
        raise ValueError("negative")
    note_run(event)
