"""Starting the shop's processes, and ending every one of them.

:class:`Landscape` starts each service as ``amqpkit run
examples.shop.<name>:service --health-port P`` and the gateway as
``python -m examples.shop gateway``, each in a session (process group) of
its own, waits until each says it is ready (``/readyz``, ``/healthz``), and
ends them all: SIGTERM to each group, a few seconds' grace, then SIGKILL.
``python -m examples.shop all`` uses it for the one-command demo; the
end-to-end test uses it too, so the demo is what the test runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]  # the checkout: examples/ is imported from there

# Every service, in the order they start: the read side and the event log's writers before the gateway.
SERVICES = ("history", "notifications", "products", "reviews", "cart", "invoices", "orders")


def free_port(taken: set[int] | None = None) -> int:
    """A port nobody listens on now, and not one of ``taken`` (the kernel may hand out the same port twice)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if taken is None or port not in taken:
            if taken is not None:
                taken.add(port)
            return port


def service_command(name: str, health_port: int, *, log_json: bool = False) -> list[str]:
    return [sys.executable, "-m", "amqpkit.cli", "run", f"examples.shop.{name}:service",
            "--health-port", str(health_port), "--grace", "5", *(["--log-json"] if log_json else [])]  # fmt: skip


def gateway_command(port: int, *, log_json: bool = False) -> list[str]:
    return [sys.executable, "-m", "examples.shop", "gateway", "--port", str(port),
            *(["--log-json"] if log_json else [])]  # fmt: skip


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    ready_url: str
    log: Path | None


class Landscape:
    """A set of the shop's processes sharing one environment (``AMQP_URL``, ``SHOP_DATA``...).

    ``logs``: a folder for each process's output (``<name>.log``); without it,
    their lines go to this process's stdout, each prefixed with its name.
    ``log_json``: every process logs JSON lines (with ``trace_id`` inside a span).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        logs: Path | None = None,
        gateway_port: int | None = None,
        log_json: bool = False,
    ) -> None:
        self.log_json = log_json
        self.env = {**os.environ, **env}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.logs = logs
        self.ports: set[int] = set()
        self.gateway_port = gateway_port or free_port(self.ports)
        self.ports.add(self.gateway_port)
        self.procs: dict[str, Proc] = {}
        self.exit_codes: dict[str, int | None] = {}  # of the processes ended by the last stop_all()

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def start(self, name: str, *, extra_env: Mapping[str, str] | None = None) -> Proc:
        """Start ``name`` (a service, ``gateway``, or ``products-2`` for a second instance of products)."""
        if name in self.procs and self.procs[name].popen.poll() is None:
            raise RuntimeError(f"{name} is already running")
        if name == "gateway":
            argv, ready = gateway_command(self.gateway_port, log_json=self.log_json), f"{self.gateway_url}/healthz"
        else:
            port = free_port(self.ports)
            argv, ready = (
                service_command(name.split("-")[0], port, log_json=self.log_json),
                f"http://127.0.0.1:{port}/readyz",
            )
        env = {**self.env, **(extra_env or {})}
        out: IO[bytes] | int
        log_path = None
        if self.logs is not None:
            self.logs.mkdir(parents=True, exist_ok=True)
            log_path = self.logs / f"{name}.log"
            out = log_path.open("ab")
        else:
            out = subprocess.PIPE
        popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        if self.logs is not None:
            out.close()  # type: ignore[union-attr]
        else:
            threading.Thread(target=_prefix, args=(name, popen), daemon=True).start()
        proc = self.procs[name] = Proc(name, popen, ready, log_path)
        return proc

    def wait_ready(self, names: list[str] | None = None, timeout: float = 60.0) -> None:
        """Wait until each process answers 200 on its readiness URL; RuntimeError if one exits or time runs out."""
        deadline = time.monotonic() + timeout
        for name in names or list(self.procs):
            proc = self.procs[name]
            while True:
                code = proc.popen.poll()
                if code is not None:
                    raise RuntimeError(f"{name} exited with {code} before it was ready{self._tail(proc)}")
                try:
                    with urllib.request.urlopen(proc.ready_url, timeout=2) as answer:  # noqa: S310 (our own URL)
                        if answer.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} was not ready within {timeout:g} s{self._tail(proc)}")
                time.sleep(0.1)

    def _tail(self, proc: Proc) -> str:
        if proc.log is None or not proc.log.exists():
            return ""
        lines = proc.log.read_text(errors="replace").splitlines()[-15:]
        return ":\n" + "\n".join(lines)

    def stop(self, name: str, grace: float = 8.0) -> int | None:
        """SIGTERM the process's group, then SIGKILL after ``grace`` seconds; its exit code."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        return _end(proc.popen, grace)

    def stop_all(self, grace: float = 8.0) -> None:
        """End every process: all are told at once, then each is waited for (and killed past ``grace``).

        Their exit codes go to :attr:`exit_codes` (0: a clean stop; negative: the signal that ended it).
        """
        procs = list(self.procs.values())
        self.procs.clear()
        for proc in procs:
            if proc.popen.poll() is None:
                _signal_group(proc.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:  # told once: a second SIGTERM makes `amqpkit run` cut its graceful stop short
            self.exit_codes[proc.name] = _wait_or_kill(proc.popen, max(0.1, deadline - time.monotonic()))

    def __enter__(self) -> Landscape:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


def _signal_group(popen: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def _end(popen: subprocess.Popen[bytes], grace: float) -> int | None:
    if popen.poll() is None:
        _signal_group(popen, signal.SIGTERM)
    return _wait_or_kill(popen, grace)


def _wait_or_kill(popen: subprocess.Popen[bytes], grace: float) -> int | None:
    try:
        popen.wait(grace)
    except subprocess.TimeoutExpired:
        _signal_group(popen, signal.SIGKILL)
        popen.wait()
    _signal_group(popen, signal.SIGKILL)  # anything it left behind in its group
    return popen.returncode


def _prefix(name: str, popen: subprocess.Popen[bytes]) -> None:
    assert popen.stdout is not None
    for raw in popen.stdout:
        sys.stdout.write(f"{name:>13} | {raw.decode(errors='replace')}")
        sys.stdout.flush()


@contextlib.contextmanager
def running(env: Mapping[str, str], *, logs: Path | None = None, gateway_port: int | None = None,
            products: int = 1, timeout: float = 60.0, log_json: bool = False) -> Iterator[Landscape]:  # fmt: skip
    """Every service and the gateway, ready; all ended when the block ends, however it ends."""
    with Landscape(env, logs=logs, gateway_port=gateway_port, log_json=log_json) as shop:
        for name in SERVICES:
            shop.start(name)
        for n in range(2, products + 1):
            shop.start(f"products-{n}")
        shop.start("gateway")
        shop.wait_ready(timeout=timeout)
        yield shop
