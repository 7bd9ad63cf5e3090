"""Drive the RabbitMQ node under test: rabbitmqctl, the session's vhost, and whole-broker tests one at a time.

rabbitmqctl talks to the local default node, or to ``AMQPKIT_RABBITMQCTL_NODE`` when it is set
(``rabbitmqctl -n NODE``): point AMQP_URL and that variable at a node of your own to run the
whole-broker tests without disturbing a node that others use. ``AMQPKIT_RABBITMQCTL``, a command
line (shell-split), stands in for ``rabbitmqctl`` itself, for a node whose control tool is run
otherwise: ``eval "$(scripts/rabbitmq4.sh env)"`` sets it and AMQP_URL for the 4.x node.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

_log = logging.getLogger("tests.brokerctl")

NODE_ENV = "AMQPKIT_RABBITMQCTL_NODE"
CTL_ENV = "AMQPKIT_RABBITMQCTL"
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
# Extra nodes share the default node's Erlang cookie (in this HOME), so rabbitmqctl can drive them all.
NODE_HOME = "/var/lib/rabbitmq"

_session_vhost: list[str] = []  # the vhost the test session made for itself, when it could


def node() -> str | None:
    """The node rabbitmqctl is pointed at (None: its default, the local node)."""
    return os.environ.get(NODE_ENV) or None


def ctl_override() -> list[str]:
    """``AMQPKIT_RABBITMQCTL`` split as a shell would ([]: not set)."""
    return shlex.split(os.environ.get(CTL_ENV) or "")


def ctl_command() -> list[str]:
    """The command line that runs rabbitmqctl against the node under test."""
    target = ["-n", n] if (n := node()) else []
    return [*(ctl_override() or ["rabbitmqctl"]), *target]


def rabbitmqctl_available() -> bool:
    return bool(ctl_override()) or shutil.which("rabbitmqctl") is not None


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run rabbitmqctl against the node under test; its stdout. RuntimeError when it fails."""
    if not rabbitmqctl_available():
        pytest.fail("this test drives the broker with rabbitmqctl, which is not installed here", pytrace=False)
    result = subprocess.run([*ctl_command(), *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


async def arabbitmqctl(*args: str, timeout: float = 60) -> str:
    return await asyncio.to_thread(rabbitmqctl, *args, timeout=timeout)


def counts(
    what: Literal["channel", "connection"], scope: Literal["user", "vhost"], name: str, expected: int
) -> Callable[[], Awaitable[bool]]:
    """A check for ``waiting.until``: whether the broker counts ``expected`` channels or connections against a
    user's or a vhost's limits (3.10 and 4.x alike).

    It counts from events, a moment after each open or close, and lets in or refuses by that count: a test
    that needs a limit full, or free again, waits for it rather than assume it is current."""
    ask = f'rabbit_{what}_tracking:count_tracked_items_in({{{scope}, <<"{name}">>}}).'

    async def current() -> bool:
        return int((await arabbitmqctl("eval", ask)).strip()) == expected

    return current


START_APP_TRIES = 3


async def start_app(tries: int = START_APP_TRIES) -> None:
    """``start_app``, then ``await_startup``, on the node under test; started again when its boot fails.

    RabbitMQ 4.0.5 with deprecated features denied once failed to boot on ``start_app`` in CI: its check for
    transient non-exclusive queues failed (``no_exists`` on the queue table, not back yet) and was taken for the
    feature being in use (``failed_to_deny_deprecated_features``). The node then stayed down for every test after
    the one that restarted it. Up to ``tries`` attempts; the last one's error is the test's.
    """
    for attempt in range(1, tries + 1):
        try:
            await arabbitmqctl("start_app", timeout=180)
            await arabbitmqctl("await_startup", timeout=180)
            return
        except RuntimeError as exc:
            if attempt == tries:
                raise
            _log.warning("the node did not start (attempt %d of %d), starting it again: %s", attempt, tries, exc)
            await asyncio.sleep(1)


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


@contextlib.contextmanager
def made_vhost(prefix: str) -> Iterator[str]:
    """A vhost of the caller's own, ``guest`` allowed everything on it; deleted after."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


@contextlib.contextmanager
def made_user(prefix: str, vhost: str, password: str) -> Iterator[str]:
    """A user of the caller's own, allowed everything on ``vhost``; deleted after (unless a test did)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
        yield name
    finally:
        with contextlib.suppress(RuntimeError):  # deleted by the test (or a test that failed meanwhile)
            rabbitmqctl("delete_user", name)


def as_user(url: str, user: str, password: str) -> str:
    """``url`` with ``user`` and ``password`` in place of its own credentials (the same host, port and vhost)."""
    parts = urlsplit(url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@contextlib.contextmanager
def own_user(url: str, prefix: str, password: str) -> Iterator[str]:
    """A broker user of the test's own (``prefix`` + a random suffix) with every right on ``url``'s vhost, and
    nothing else; deleted afterwards, whatever happens."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_permissions", "-p", vhost_of(url), name, ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_user", name)


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


async def set_default_queue_type(vhost: str, queue_type: str) -> None:
    """Give ``vhost`` a default queue type, as an operator does: what is declared there without an ``x-queue-type``
    afterwards is of that type. RabbitMQ 4.x has ``update_vhost_metadata``; 3.10 has no command for it (only
    ``add_vhost --default-queue-type``), so there the vhost's metadata is changed as that command would."""
    try:
        await arabbitmqctl("update_vhost_metadata", vhost, "--default-queue-type", queue_type)
        return
    except RuntimeError as exc:
        if "not found" not in str(exc):
            raise
    binary = vhost.replace("\\", "\\\\").replace('"', '\\"')
    await arabbitmqctl(
        "eval",
        "rabbit_misc:execute_mnesia_transaction(fun() -> rabbit_vhost:update_metadata("
        f'<<"{binary}">>, fun(M) -> M#{{default_queue_type => <<"{queue_type}">>}} end) end).',
    )


async def listed(what: str, name: str, field: str, *args: str) -> str:
    """``field`` of the ``name`` row of ``rabbitmqctl list_WHAT ARGS name FIELD`` (``what``: queues, vhosts)."""
    out = await arabbitmqctl(f"list_{what}", *args, "-q", "--no-table-headers", "name", field)
    for line in out.splitlines():
        fields = line.split("\t")
        if fields[0] == name:
            return fields[1]
    raise AssertionError(f"{name} is not listed: {out!r}")


async def default_queue_type(vhost: str) -> str:
    """``vhost``'s default queue type as the broker lists it (``undefined`` when none was set, on 3.10)."""
    return await listed("vhosts", vhost, "default_queue_type")


async def queue_type(url: str, queue: str) -> str:
    """The type the broker gave ``queue`` in ``url``'s vhost (classic, quorum, stream)."""
    return await listed("queues", queue, "type", *vhost_args(url))


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


def lock_label() -> str:
    """Names the node under test in the lock files: its rabbitmqctl command line, else its node name."""
    if not (ctl_override() or node()):
        return "default"
    label = " ".join(ctl_command())
    # A readable tail plus a digest of the whole line: two lines that end alike must not share a lock.
    digest = hashlib.sha256(label.encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', label)[-60:]}-{digest}"


def _lock_file(kind: str) -> Path:
    label = lock_label()
    return Path(tempfile.gettempdir()) / f"amqpkit-tests.{label}.{kind}.lock"


def _flock(path: Path, mode: int, deadline: float, what: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # made by another user: reading is enough to lock it
        fd = os.open(path, os.O_RDONLY)
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


# ---------------------------------------------------------------- a node of one's own


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SpareNode:
    """A RabbitMQ node of its own (name, ports, folders in ``directory``), from the local installation.

    For tests that need a node configured otherwise (TLS), and for running the whole-broker tests
    against a node nobody else uses::

        AMQP_URL=<node.url> AMQPKIT_RABBITMQCTL_NODE=<node.name> pytest -m whole_broker

    Its crash dump, if it fails to start, goes into ``directory`` too, not the working folder.
    """

    PREFIX = "amqpkit-node"

    def __init__(self, directory: Path, config: str = "") -> None:
        self.directory = directory
        self.name = f"{self.PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}@localhost"
        self.port = free_port()
        self.extra_config = config

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _node_ctl(self.name, *args, timeout=timeout)

    def start(self, timeout: float = 120) -> None:
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            pytest.fail("starting a RabbitMQ node of its own needs the local rabbitmq-server", pytrace=False)
        stop_orphan_nodes()
        d = self.directory
        (d / "node.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n{self.extra_config}")
        (d / "enabled_plugins").write_text("[].\n")
        env = {
            **os.environ,
            "HOME": NODE_HOME,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONFIG_FILE": str(d / "node.conf"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(d / "node.pid"),
            "ERL_CRASH_DUMP": str(d / "erl_crash.dump"),
        }
        subprocess.run([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], env=env, cwd=d, check=True, timeout=30)
        deadline = time.monotonic() + timeout
        while self.ctl("await_startup", "--timeout", "30").returncode != 0:
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-3000:] for p in (d / "log").glob("*.log"))
                self.stop()
                pytest.fail(f"the node {self.name} did not start:\n{logs}", pytrace=False)
            time.sleep(1)  # await_startup returned at once: the node is not registered yet

    def stop(self) -> None:
        self.ctl("stop", timeout=60)


def _node_ctl(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RABBIT_BIN / "rabbitmqctl"), "-n", name, *args],
        env={**os.environ, "HOME": NODE_HOME, "ERL_CRASH_DUMP": os.devnull},
        cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def stop_orphan_nodes() -> None:
    """Stop nodes of our own left running by a test run that was killed (its process is gone)."""
    try:
        names = subprocess.run(["epmd", "-names"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    for m in re.finditer(rf"^name ({SpareNode.PREFIX}-(\d+)-[0-9a-f]+) at port", names, re.M):
        if not Path(f"/proc/{m.group(2)}").exists():
            _node_ctl(f"{m.group(1)}@localhost", "stop", timeout=60)


@contextlib.contextmanager
def consumer_timeout_node(directory: Path, timeout_ms: int) -> Iterator[SpareNode]:
    """A node of its own whose ``consumer_timeout`` is ``timeout_ms``, checked every second; stopped after.

    On 3.10 the timeout is node-wide, so it is never changed on a node that others use.
    """
    node = SpareNode(directory)
    node.start()
    try:
        done = node.ctl(
            "eval",
            f"application:set_env(rabbit, consumer_timeout, {timeout_ms}), "
            "application:set_env(rabbit, channel_tick_interval, 1000).",
        )
        assert done.returncode == 0, done.stderr
        yield node
    finally:
        node.stop()


def main() -> None:
    """``python -m tests.brokerctl``: a node of one's own, for the whole-broker tests.

    With no arguments, the node runs until Enter or Ctrl-C. With ``--run CMD ...`` it runs CMD with
    ``AMQP_URL`` and ``AMQPKIT_RABBITMQCTL_NODE`` set to that node, then stops the node (also on SIGTERM)
    and exits with CMD's status: CI's long checks run this way, beside the suite on the default node.
    """
    import signal
    import sys

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up below is not cut short by another
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    command = sys.argv[2:] if sys.argv[1:2] == ["--run"] else None
    if command == []:
        sys.exit("usage: python -m tests.brokerctl [--run CMD ...]")
    with tempfile.TemporaryDirectory(prefix="amqpkit-node-") as d:
        spare = SpareNode(Path(d))
        try:
            spare.start()  # inside: a SIGTERM while it starts stops it too
            if command is None:
                print(f"export AMQP_URL={spare.url} {NODE_ENV}={spare.name}", flush=True)
                print("(Enter or Ctrl-C stops the node)", file=sys.stderr, flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    sys.stdin.readline()
                return
            env = {**os.environ, "AMQP_URL": spare.url, NODE_ENV: spare.name}
            child = subprocess.Popen(command, env=env)
            try:
                status = child.wait()
            finally:
                if child.poll() is None:
                    child.terminate()
                    try:
                        child.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
            sys.exit(status if status >= 0 else 128 - status)  # killed by signal N: 128 + N, as a shell says
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            spare.stop()


if __name__ == "__main__":
    main()
