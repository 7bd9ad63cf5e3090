"""`amqpkit run` and `amqpkit worker` stopped by a signal before the service runs: exit 0, no traceback."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

from .. import processes
from .test_run_cli import ROOT, Run

COMMANDS = {
    "run": ["run", "tests.service.slow_import:service", "--grace", "2"],
    "worker": ["worker", "tests.service.slow_import:handle", "--grace", "2"],
}


@pytest.mark.usefixtures("spawned")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_a_signal_while_the_users_module_is_imported_ends_the_command_cleanly(
    command: str, sig: signal.Signals, name: str
) -> None:
    """The signal handlers were installed only once the service ran, after the user's module was imported: a
    SIGTERM or Ctrl-C in the first second (or a long import) killed the process, exit 143 (-15 here) or a
    KeyboardInterrupt traceback and 130 (-2), in 3 of 3 runs each signalled 0.4 s after the start. Expected: the
    stop during the start the docs promise, exit 0, no traceback."""
    args = [*COMMANDS[command], *(["--queue", f"{name}.jobs"] if command == "worker" else [])]
    proc = await processes.spawn(sys.executable, "-m", "amqpkit.cli", *args, cwd=ROOT,
                                 env={**os.environ, "AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"},
                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    run = Run(proc)
    for _ in range(300):  # the module is being imported (it sleeps 60 s in its import)
        if any("importing slowly" in line for line in run.out) or proc.returncode is not None:
            break
        await asyncio.sleep(0.1)
    assert any("importing slowly" in line for line in run.out), run.text()
    began = time.monotonic()
    proc.send_signal(sig)
    code = await run.exit(timeout=30)
    assert time.monotonic() - began < 20, run.text()
    assert code == 0, run.text()
    assert not any("Traceback" in line for line in run.err + run.out), run.text()
