"""No password on a command line: `ps` shows every process's arguments to every local user.

``amqpkit bench`` starts its serving sides as processes of their own; while it
runs, the command line of each of them (``/proc/PID/cmdline``) is read and must
not hold the broker password.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from . import processes
from .brokerctl import as_user, own_user

pytestmark = pytest.mark.usefixtures("spawned")  # every process a test starts is ended, whatever the outcome

PASSWORD = f"Argv-{uuid.uuid4().hex[:12]}-secret"
SERVE_MODULE = "amqpkit.bench.serve"


@pytest.fixture
def user_url(amqp_url: str) -> Iterator[str]:
    """``amqp_url`` with a user of this test's own, whose password appears nowhere else."""
    with own_user(amqp_url, "amqpkit-argv", PASSWORD) as user:
        yield as_user(amqp_url, user, PASSWORD)


def command_lines_under(root: int) -> dict[int, str]:
    """The command line of every living descendant of ``root`` (arguments joined by spaces; '' for a zombie)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name, in parentheses, may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        found[pid] = raw.replace(b"\0", b" ").decode(errors="replace")
        todo += children.get(pid, [])
    return found


async def test_bench_children_do_not_show_the_password(user_url: str) -> None:
    bench = await processes.spawn(
        sys.executable, "-m", "amqpkit.cli", "bench", "--scenario", "oneway,rpc", "--concurrency", "1",
        "--duration", "1", "--warmup", "10",
        env={**os.environ, "AMQP_URL": user_url}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    seen: dict[int, set[str]] = {}  # every command line each process was seen with
    finished = asyncio.ensure_future(bench.communicate())
    try:
        # Read the children's command lines for as long as the bench runs.
        while not finished.done():
            for pid, line in command_lines_under(bench.pid).items():
                seen.setdefault(pid, set()).add(line)
            await asyncio.wait({finished}, timeout=0.02)
        out, err = await finished
    finally:
        await processes.end(bench)
        if not finished.done():
            finished.cancel()
    assert bench.returncode == 0, err.decode()
    servers = [pid for pid, lines in seen.items() if any(SERVE_MODULE in line for line in lines)]
    assert len(servers) == 2, seen  # one serving process per scenario, each seen while it ran
    leaked = [
        pid for pid, lines in seen.items() if any(PASSWORD in ln or quote(PASSWORD, safe="") in ln for ln in lines)
    ]
    assert not leaked, f"the password is on the command line of {len(leaked)} of {len(seen)} processes"
    assert PASSWORD not in out.decode() + err.decode()
