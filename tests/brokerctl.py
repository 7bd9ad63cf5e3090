"""Drive the RabbitMQ node under test: rabbitmqctl, the session's vhost, and whole-broker tests one at a time.

rabbitmqctl talks to the local default node, or to ``AMQPKIT_RABBITMQCTL_NODE`` when it is set
(``rabbitmqctl -n NODE``): point AMQP_URL and that variable at a node of your own to run the
whole-broker tests without disturbing a node that others use.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

NODE_ENV = "AMQPKIT_RABBITMQCTL_NODE"

_session_vhost: list[str] = []  # the vhost the test session made for itself, when it could


def node() -> str | None:
    """The node rabbitmqctl is pointed at (None: its default, the local node)."""
    return os.environ.get(NODE_ENV) or None


def rabbitmqctl_available() -> bool:
    return shutil.which("rabbitmqctl") is not None


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run rabbitmqctl against the node under test; its stdout. RuntimeError when it fails."""
    if not rabbitmqctl_available():
        pytest.fail("this test drives the broker with rabbitmqctl, which is not installed here", pytrace=False)
    target = ["-n", n] if (n := node()) else []
    result = subprocess.run(["rabbitmqctl", *target, *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


async def arabbitmqctl(*args: str, timeout: float = 60) -> str:
    return await asyncio.to_thread(rabbitmqctl, *args, timeout=timeout)


# ---------------------------------------------------------------- vhosts


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names ('/' when it names none)."""
    path = urlsplit(url.split(",")[0].strip()).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def with_vhost(url: str, vhost: str) -> str:
    """``url`` (or each of several comma-separated URLs) pointed at ``vhost``."""

    def one(u: str) -> str:
        parts = urlsplit(u.strip())
        return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), parts.query, parts.fragment))

    return ",".join(one(u) for u in url.split(","))


def session_vhost() -> str | None:
    """The vhost this test session made for itself (None: it uses the URL it was given, shared with others)."""
    return _session_vhost[0] if _session_vhost else None


def set_session_vhost(vhost: str | None) -> None:
    _session_vhost.clear()
    if vhost is not None:
        _session_vhost.append(vhost)


def vhost_args(url: str) -> list[str]:
    """``-p VHOST`` for rabbitmqctl commands that list or act on one vhost (the one ``url`` names)."""
    return ["-p", vhost_of(url)]


async def close_connections(url: str, reason: str) -> None:
    """Close every connection in ``url``'s vhost from the broker's side (connection.close, not a reset).

    With the session's own vhost (see conftest) that is only this session's connections;
    on a shared vhost it is everybody's, so the test is marked ``whole_broker(vhost_only=True)``.
    """
    await arabbitmqctl("close_all_connections", *vhost_args(url), reason)


# ---------------------------------------------------------------- the memory watermark


def memory_watermark() -> list[str]:
    """The node's vm_memory_high_watermark, as arguments for ``rabbitmqctl set_vm_memory_high_watermark``."""
    out = rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().").strip()
    if m := re.fullmatch(r"\{absolute,\s*(\d+)\}", out):
        return ["absolute", m.group(1)]
    if re.fullmatch(r"\{relative,\s*([0-9.eE+-]+)\}", out):
        out = out.split(",", 1)[1].rstrip("}").strip()
    try:
        float(out)
    except ValueError:
        raise RuntimeError(f"cannot read the memory watermark from {out!r}") from None
    return [out]


def memory_alarm_raised() -> bool:
    return "memory" in rabbitmqctl("eval", "rabbit_alarm:get_alarms().")


# ---------------------------------------------------------------- one at a time


def _lock_file(kind: str) -> Path:
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", node() or "default")
    return Path(tempfile.gettempdir()) / f"amqpkit-tests.{label}.{kind}.lock"


def _flock(path: Path, mode: int, deadline: float, what: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                pytest.fail(f"waited too long for {what} ({path})", pytrace=False)
            time.sleep(0.05)  # polling a lock file: there is nothing to wait on instead


@contextlib.contextmanager
def broker_turn(exclusive: bool, timeout: float = 600) -> Iterator[None]:
    """Hold the node under test for the duration, across every pytest run on this machine.

    Every test holds it shared; a test that acts on the whole broker holds it alone, so it
    runs while no other test (of this run or another) is running against that node. A gate
    lock in front gives a waiting whole-broker test precedence over tests arriving later.
    """
    deadline = time.monotonic() + timeout
    what = "the broker to itself" if exclusive else "a whole-broker test elsewhere to end"
    gate = _flock(_lock_file("gate"), fcntl.LOCK_EX, deadline, what)
    try:
        held = _flock(_lock_file("turn"), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, deadline, what)
    finally:
        os.close(gate)  # closing the descriptor releases its lock
    try:
        yield
    finally:
        os.close(held)
