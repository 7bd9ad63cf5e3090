"""Processes a test starts, ended whatever the test's outcome.

``spawn`` starts a process in a session (and so a process group) of its own and
records it; the ``spawned`` fixture (tests/conftest.py) ends every recorded one at the
end of the test: SIGTERM to the group, a few seconds' grace, then SIGKILL, and
waits for it. Anything the process started in turn goes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

_running: list[asyncio.subprocess.Process] = []
_active: list[bool] = []


def activate() -> None:
    _active.append(True)


async def spawn(*argv: str, **kw: Any) -> asyncio.subprocess.Process:
    """``asyncio.create_subprocess_exec(*argv, **kw)``, ended at the end of the test (needs the ``spawned`` fixture)."""
    if not _active:
        raise RuntimeError("a test that starts processes uses the `spawned` fixture, which ends them")
    proc = await asyncio.create_subprocess_exec(*argv, start_new_session=True, **kw)
    _running.append(proc)
    return proc


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def end(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """SIGTERM the process's group, wait ``grace`` seconds, then SIGKILL it; returns once it has exited."""
    if proc.returncode is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            _signal_group(proc, signal.SIGKILL)
            await proc.wait()
    # Whatever it started and left behind in its group goes too.
    _signal_group(proc, signal.SIGKILL)


async def end_all() -> None:
    try:
        while _running:
            await end(_running.pop())
    finally:
        _active.clear()
