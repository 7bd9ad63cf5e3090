"""Run tutorial scripts as subprocesses and read what they print.

They are started with ``processes.spawn``: a test that uses them takes the ``spawned``
fixture, which ends any script still running when the test ends, however it ends.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from . import processes

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


class Script:
    """A running tutorial script whose stdout is read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name

    @classmethod
    async def start(cls, relpath: str, *args: str, url: str) -> Script:
        env = {**os.environ, "AMQP_URL": url, "PYTHONUNBUFFERED": "1"}
        proc = await processes.spawn(
            sys.executable,
            str(TUTORIALS / relpath),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        return cls(proc, relpath)

    async def line(self, timeout: float = 15) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            err = await self._stderr()
            raise AssertionError(f"{self.name} ended without printing more; stderr: {err}")
        return raw.decode().rstrip("\n")

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, str, str]:
        """Signal it, wait; returns (exit code, rest of stdout, stderr)."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), err.decode()

    async def _stderr(self) -> str:
        assert self.proc.stderr is not None
        try:
            return (await asyncio.wait_for(self.proc.stderr.read(), 5)).decode()
        except TimeoutError:
            return "(no stderr)"


async def run(relpath: str, *args: str, url: str, timeout: float = 30) -> tuple[int, str, str]:
    """Run a script to its end; (exit code, stdout, stderr). Past ``timeout`` it is ended and the test fails."""
    script = await Script.start(relpath, *args, url=url)
    try:
        out, err = await asyncio.wait_for(script.proc.communicate(), timeout)
    except TimeoutError:
        await processes.end(script.proc)
        raise AssertionError(f"{relpath} {' '.join(args)} did not end within {timeout} s") from None
    assert script.proc.returncode is not None
    return script.proc.returncode, out.decode(), err.decode()
