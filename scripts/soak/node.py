"""The soak's own RabbitMQ node, and rabbitmqctl against whichever node the soak drives.

The own node has a name, AMQP and distribution ports, data, log and crash-dump
folders, and an Erlang cookie of its own (in a HOME inside the work folder,
shared by the node and our rabbitmqctl, so ``rabbitmqctl -n`` reaches it).
Whole-broker faults therefore hit only the soak's node, never the machine's
shared one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import time
from datetime import datetime
from pathlib import Path

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
_DELETED = re.compile(r"^(\S+ \S+) \[\w+\] <[^>]*> queue '([^']+)' in vhost '[^']*': terminating with reason 'delete'")
_CANNOT_FORWARD = re.compile(
    r"^(\S+ \S+) \[\w+\] <[^>]*> Cannot forward any dead-letter messages from source quorum queue '([^']+)'"
)


class CtlError(RuntimeError):
    """rabbitmqctl failed (its exit code and stderr are in the message)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    """The rabbitmq tool itself, not Debian's wrapper in /usr/sbin (which would switch to the rabbitmq user)."""
    direct = RABBIT_BIN / name
    if direct.exists():
        return str(direct)
    found = shutil.which(name)
    if found is None:
        raise CtlError(
            f"{name} is not installed here; the soak needs a local RabbitMQ (apt-get install rabbitmq-server)"
        )
    return found


class Ctl:
    """rabbitmqctl against one node (``node=None``: the default node of this machine)."""

    def __init__(self, node: str | None, env: dict[str, str] | None = None, binary: str | None = None) -> None:
        self.node = node
        self.env = env
        self.binary = binary or shutil.which("rabbitmqctl") or _tool("rabbitmqctl")

    def argv(self, *args: str) -> list[str]:
        return [self.binary, *(["-n", self.node] if self.node else []), *args]

    async def run(self, *args: str, timeout: float = 60) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self.argv(*args),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            text = (err or out).decode(errors="replace").strip().splitlines()
            raise CtlError(f"rabbitmqctl {' '.join(args)} failed ({proc.returncode}): {' / '.join(text[-3:])}")
        return out.decode(errors="replace")

    def run_sync(self, *args: str, timeout: float = 60) -> int:
        try:
            return subprocess.run(self.argv(*args), env=self.env, capture_output=True, timeout=timeout).returncode
        except (OSError, subprocess.TimeoutExpired):
            return -1


class OwnNode:
    """A RabbitMQ node started for the soak and stopped after it, whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "node"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = f"amqpkit-soak-{os.getpid()}@localhost"
        self.amqp_port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.amqp_port:
            self.dist_port = free_port()
        home = self.dir / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(20)))
            cookie.chmod(0o400)
        (self.dir / "node.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\nloopback_users.guest = true\nlog.file.level = info\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        # The setting patterns/work-queue.md recommends ("Retries across a broker restart"): a retry that
        # fell due while the node was down is retried by the node after 5 s instead of 180 s.
        (self.dir / "advanced.config").write_text(
            "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].\n"
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        self.ctl_env = {**base, "HOME": str(home)}
        self.env = {
            **self.ctl_env,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "node.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "node.pid"),
            "ERL_CRASH_DUMP": str(self.dir / "erl_crash.dump"),
        }
        self.ctl = Ctl(self.name, self.ctl_env, _tool("rabbitmqctl"))
        self.started = False

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    def describe(self) -> dict[str, object]:
        return {"node": self.name, "amqp_port": self.amqp_port, "dist_port": self.dist_port, "own_node": True}

    async def start(self, timeout: float = 120) -> None:
        (self.dir / "started-by").write_text(f"{os.getpid()}\n{self.name}\n")
        proc = await asyncio.create_subprocess_exec(
            _tool("rabbitmq-server"),
            "-detached",
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.started = True
        await asyncio.wait_for(proc.wait(), 60)
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.ctl.run("await_startup", "--timeout", "30", timeout=40)
                return
            except CtlError as exc:
                if time.monotonic() > deadline:
                    raise CtlError(f"the soak's node did not start: {exc}\n{self.log_tail()}") from None
            await asyncio.sleep(1)

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted((self.dir / "log").glob("*.log"))
        return "\n".join(p.read_text(errors="replace")[-chars:] for p in logs)

    def quorum_queues_deleted(self) -> list[tuple[float, str]]:
        """(epoch seconds, name) of each quorum queue the node deleted, from its log: by a client, an
        operator, or its own expiry (``x-expires``); the log does not say which."""
        return self._log_lines(_DELETED)

    def dead_letters_stuck(self) -> list[tuple[float, str]]:
        """(epoch seconds, name) of each quorum queue whose at-least-once dead-lettering could not
        forward, from the node's log (seen on recovery after a restart: the messages stay in the queue)."""
        return self._log_lines(_CANNOT_FORWARD)

    def _log_lines(self, pattern: re.Pattern[str]) -> list[tuple[float, str]]:
        found = []
        for path in (self.dir / "log").glob("*.log"):
            for line in path.read_text(errors="replace").splitlines():
                m = pattern.match(line)
                if m:
                    with contextlib.suppress(ValueError):
                        found.append((datetime.fromisoformat(m.group(1)).timestamp(), m.group(2)))
        return sorted(found)

    def _pid(self) -> int | None:
        try:
            return int((self.dir / "node.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop the node (synchronous, so it also runs from a finally after the loop is gone)."""
        if not self.started:
            return
        pid = self._pid()
        self.ctl.run_sync("stop", timeout=60)
        if pid is not None:
            deadline = time.monotonic() + 20
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.started = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
