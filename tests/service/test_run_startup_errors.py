"""`amqpkit run`: a start that fails outside the broker is one `error:` line, not a traceback.

Found by a hunt. patterns/services.md, on `amqpkit run`'s exit codes: "Each error is one line, never a
traceback." Two starts break that, each printing Typer's boxed traceback (142 lines for the port, 180 for
a hook on 3.10.8), exit 1:
- ``--health-port`` on a port already taken (a second instance on the host): ``OSError: [Errno 98] ...
  address already in use`` from the health server (``--metrics-port`` on a taken port is one line, exit 2);
- a startup hook (or resource) that raises an exception of its own (``ConnectionRefusedError``); one that
  raises amqpkit's errors (``open_store`` of a PostgreSQL that is down) is one line;
- and `amqpkit worker` ("the same runner for a service of one worker") on a module that raises while it is
  imported, which `amqpkit run` reports in one line, exit 2.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import pytest

from amqpkit import Broker

from .. import processes
from ..brokerctl import free_port
from .test_run_cli import ROOT, Run

pytestmark = pytest.mark.usefixtures("spawned")


def one_error_line(run: Run, says: str) -> None:
    assert not any("Traceback" in line or "╭" in line for line in run.err), run.text()
    assert run.err[-1].startswith("error: ") and says in run.err[-1], run.text()


async def test_a_health_port_in_use_is_one_line(amqp_url: str) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        run = await Run.start("tests.service.apps:workers", "--health-port", str(port), env={"AMQP_URL": amqp_url})
        assert await run.exit() != 0, run.text()
    one_error_line(run, str(port))


async def test_a_startup_hook_that_raises_is_one_line(amqp_url: str, broker: Broker, name: str) -> None:
    try:
        run = await Run.start("tests.service.startup_apps:hook_fails", env={"AMQP_URL": amqp_url, "SVC_PREFIX": name})
        assert await run.exit() == 1, run.text()
        one_error_line(run, "cache at 127.0.0.1:1 refused the connection")
    finally:
        await broker.delete_queue(f"{name}.jobs")
        await broker.delete_queue(f"{name}.jobs.dlq")


async def test_amqpkit_worker_on_a_module_that_raises_at_import_is_one_line(amqp_url: str) -> None:
    # `amqpkit run` on the same module: "error: cannot import ...: RuntimeError: ...", exit 2. `amqpkit worker`
    # catches ImportError only: a boxed traceback (47 lines; 49 for a SyntaxError), exit 1.
    proc = await processes.spawn(
        sys.executable, "-m", "amqpkit.cli", "worker", "tests.service.broken_at_import:handle", "--queue", "q",
        cwd=ROOT, env={**os.environ, "AMQP_URL": amqp_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = err.decode().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, lines[-3:], len(lines))
    assert lines[0].startswith("error: ") and "config file /etc/app.toml not found" in lines[0], lines
