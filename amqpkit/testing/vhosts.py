"""Vhosts for tests: one per test, made ahead a few at a time and deleted in batches, on the broker under test.

Made through the management HTTP API when it answers
(``AMQPKIT_MANAGEMENT_URL``, else port 15672 on the broker's host with the
URL's user), else with ``rabbitmqctl`` on this machine
(``AMQPKIT_RABBITMQCTL_NODE`` names another node; ``AMQPKIT_RABBITMQCTL``, a
command line, stands in for ``rabbitmqctl`` itself). The pytest plugin
(:mod:`amqpkit.testing`) hands them out; :func:`own_vhost` tells whether a URL
is on one of them.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

from ..connection import Broker
from ..settings import BrokerSettings, ReconnectPolicy

NO_VHOSTS = (
    "cannot make a vhost per test on the broker at {where}: its management API does not answer "
    "(enable it: rabbitmq-plugins enable rabbitmq_management, or set AMQPKIT_MANAGEMENT_URL) and "
    "rabbitmqctl {ctl}. Set AMQPKIT_TEST_VHOST=0 to run every test in the URL's own vhost instead."
)
VHOST_PREFIX = "amqpkit-test-"
ACTING_USER = "amqpkit-tests"
NODE_ENV = "AMQPKIT_RABBITMQCTL_NODE"
CTL_ENV = "AMQPKIT_RABBITMQCTL"  # a command line standing for rabbitmqctl (e.g. "scripts/rabbitmq4.sh ctl")


def ctl_command() -> list[str]:
    """How to run rabbitmqctl for the node under test: ``AMQPKIT_RABBITMQCTL`` (shell-split), else ``rabbitmqctl``."""
    return shlex.split(os.environ.get(CTL_ENV) or "") or ["rabbitmqctl"]


HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:20] or "host"

_own: set[str] = set()  # vhosts this process made (and has not deleted yet)


# ---------------------------------------------------------------------- URLs


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


def own_vhost(url: str) -> bool:
    """Whether ``url``'s vhost was made by this plugin for one test (and so is seen by nobody else)."""
    return vhost_of(url) in _own


# ---------------------------------------------------------------------- making vhosts


class _Management:
    """Vhosts through the management HTTP API."""

    def __init__(self, base: str, user: str, password: str) -> None:
        parts = urlsplit(base)
        netloc = f"{parts.hostname}:{parts.port or 15672}"  # the credentials go in a header, never in the URL
        self.base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        user = unquote(parts.username) if parts.username else user
        password = unquote(parts.password) if parts.password else password
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.where = self.base

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)  # noqa: S310 - our own URL
        request.add_header("Authorization", self.auth)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            raw = response.read()
        return json.loads(raw) if raw else None

    def usable(self, deadline: float = 2) -> bool:
        try:
            self._call("GET", "/api/overview", timeout=deadline)
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return True

    def make(self, names: Sequence[str], user: str) -> None:
        for name in names:
            self._call("PUT", f"/api/vhosts/{quote(name, safe='')}", {})
            self._call(
                "PUT", f"/api/permissions/{quote(name, safe='')}/{quote(user, safe='')}",
                {"configure": ".*", "write": ".*", "read": ".*"},
            )  # fmt: skip

    def delete(self, names: Sequence[str]) -> None:
        for name in names:
            with contextlib.suppress(urllib.error.HTTPError):  # already gone
                self._call("DELETE", f"/api/vhosts/{quote(name, safe='')}", timeout=120)

    def listed(self) -> list[str]:
        return [v["name"] for v in self._call("GET", "/api/vhosts?columns=name")]


class _Rabbitmqctl:
    """Vhosts with rabbitmqctl on this machine: several per call (it takes a second or two to start)."""

    def __init__(self) -> None:
        node = os.environ.get(NODE_ENV)
        self.command = [*ctl_command(), *(["-n", node] if node else [])]
        self.where = f"node {node}" if node else f"the node of {' '.join(ctl_command())!r}"
        self.batched = True

    @staticmethod
    def available() -> bool:
        return bool(os.environ.get(CTL_ENV)) or shutil.which("rabbitmqctl") is not None

    def ctl(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {args[0]} failed: {done.stderr.strip()[:500]}")
        return done.stdout

    def make(self, names: Sequence[str], user: str) -> None:
        if self.batched and _ERLANG_SAFE.fullmatch(user) and all(_ERLANG_SAFE.fullmatch(n) for n in names):
            calls = ", ".join(
                f'{{rabbit_vhost:add(<<"{n}">>, <<"{ACTING_USER}">>), rabbit_auth_backend_internal:set_permissions('
                f'<<"{user}">>, <<"{n}">>, <<".*">>, <<".*">>, <<".*">>, <<"{ACTING_USER}">>)}}'
                for n in names
            )
            try:
                if self.ctl("eval", f"[{calls}].").count("{ok,ok}") == len(names):
                    return
            except RuntimeError:
                pass
            self.batched = False  # this node's internals differ: the public commands, one vhost at a time
            self.delete(names)
        for name in names:
            self.ctl("add_vhost", name)
            self.ctl("set_permissions", "-p", name, user, ".*", ".*", ".*")

    def delete(self, names: Sequence[str]) -> None:
        if not names:
            return
        if self.batched and all(_ERLANG_SAFE.fullmatch(n) for n in names):
            calls = ", ".join(f'rabbit_vhost:delete(<<"{n}">>, <<"{ACTING_USER}">>)' for n in names)
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.ctl("eval", f"[{calls}].", timeout=300)
                return
        for name in names:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):  # already gone
                self.ctl("delete_vhost", name, timeout=300)

    def listed(self) -> list[str]:
        return self.ctl("list_vhosts", "-q", "name", timeout=60).split()


_ERLANG_SAFE = re.compile(r"[A-Za-z0-9_.@+-]+")


class VhostPool:
    """Fresh vhosts on demand, made ahead a few at a time; used ones deleted in batches in the background."""

    MAX_BATCH = 16
    DELETE_BATCH = 8

    def __init__(self, maker: _Management | _Rabbitmqctl, user: str, *, batch: int = 2) -> None:
        self.maker = maker
        self.user = user
        self._batch = batch
        self._ready: collections.deque[str] = collections.deque()
        self._used: list[str] = []
        self._lock = threading.Lock()
        self._making: concurrent.futures.Future[None] | None = None
        self._deleting: concurrent.futures.Future[None] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="amqpkit-vhosts")

    @staticmethod
    def new_name() -> str:
        return f"{VHOST_PREFIX}{HOST}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def _make(self, count: int) -> None:
        names = [self.new_name() for _ in range(count)]
        _own.update(names)
        try:
            self.maker.make(names, self.user)
        except BaseException:
            with contextlib.suppress(Exception):
                self.maker.delete(names)
            _own.difference_update(names)
            raise
        with self._lock:
            self._ready.extend(names)

    def acquire(self) -> str:
        """A vhost nobody has used."""
        while True:
            with self._lock:
                if self._ready:
                    name = self._ready.popleft()
                    self._refill_locked()
                    return name
                making = self._making
            if making is not None:
                making.result()  # a batch on its way: wait for it (its error, if any, is raised here)
                with self._lock:
                    if self._making is making:
                        self._making = None
                continue
            self._make(self._batch)
            self._batch = min(self.MAX_BATCH, self._batch * 2)

    def _refill_locked(self) -> None:
        if len(self._ready) < 2 and (self._making is None or self._making.done()):
            count, self._batch = self._batch, min(self.MAX_BATCH, self._batch * 2)
            self._making = self._pool.submit(self._make, count)

    def release(self, name: str) -> None:
        """Done with ``name``: it is deleted (soon, with others)."""
        with self._lock:
            self._used.append(name)
            if len(self._used) >= self.DELETE_BATCH and (self._deleting is None or self._deleting.done()):
                batch, self._used = self._used, []
                self._deleting = self._pool.submit(self._delete, batch)

    def _delete(self, names: list[str]) -> None:
        self.maker.delete(names)
        _own.difference_update(names)

    def delete_orphans(self) -> None:
        """Delete the vhosts of earlier runs on this machine that were killed before their clean-up."""
        for vhost in self.maker.listed():
            m = re.fullmatch(rf"{VHOST_PREFIX}{HOST}-(\d+)-[0-9a-f]+", vhost)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                self.maker.delete([vhost])

    def close(self) -> None:
        """Delete every vhost made, used or not."""
        for pending in (self._making, self._deleting):
            if pending is not None:
                with contextlib.suppress(Exception):
                    pending.result()
        self._pool.shutdown(wait=True)
        with self._lock:
            left = [*self._used, *self._ready]
            self._used, self._ready = [], collections.deque()
        self._delete(left)


def _run_async(coro_fn: Callable[[], Any]) -> Any:
    """Run a coroutine to the end on a loop of its own, in a thread (safe whether or not a loop runs here)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coro_fn())).result()


def _opens(url: str) -> bool:
    async def attempt() -> bool:
        settings = BrokerSettings(url=url, connect_timeout=10, reconnect=ReconnectPolicy(connect_attempts=1))
        broker = Broker(settings)
        try:
            await broker.connect()
        except Exception:
            return False
        await broker.close()
        return True

    return bool(_run_async(attempt))


def vhost_pool(url: str, management_url: str | None) -> VhostPool:
    """A pool that makes vhosts on the broker behind ``url``; fails the run, saying why, if nothing can."""
    parts = urlsplit(url.split(",")[0].strip())
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    makers: list[_Management | _Rabbitmqctl] = []
    management = _Management(management_url or f"http://{parts.hostname or '127.0.0.1'}:15672", user, password)
    if management.usable():
        makers.append(management)
    if _Rabbitmqctl.available():
        makers.append(_Rabbitmqctl())
    problems: list[str] = []
    for maker in makers:
        pool = VhostPool(maker, user)
        try:
            pool.delete_orphans()
            first = pool.acquire()
        except (RuntimeError, OSError, subprocess.TimeoutExpired, urllib.error.URLError) as exc:
            problems.append(f"{type(maker).__name__.strip('_')}: {exc}")
            continue
        if _opens(with_vhost(url, first)):  # the same broker the URL reaches, and the user may use it
            pool.release(first)
            return pool
        pool.release(first)
        pool.close()
        problems.append(f"{maker.where} is not the broker at {parts.hostname}:{parts.port or 5672}")
    ctl = "is not installed here" if not _Rabbitmqctl.available() else "failed: " + "; ".join(problems)
    pytest.fail(NO_VHOSTS.format(where=f"{parts.hostname}:{parts.port or 5672}", ctl=ctl), pytrace=False)
