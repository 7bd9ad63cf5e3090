"""Serving sides as the driver sees them: in a process of their own, several of them, or in this event loop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import sys
from typing import Any

from .base import ServerOptions, ServerSide, Window
from .stats import LatencyRecorder

__all__ = ["ChainSide", "GroupSide", "LocalSide", "RemoteSide", "Side"]


class Side:
    """A serving side, in a subprocess or in this event loop, with one interface."""

    endpoint = ""

    async def start(self) -> None:
        raise NotImplementedError

    async def report(self, expected: int, timeout: float = 60.0) -> dict[str, Any]:
        raise NotImplementedError

    async def reset(self, origin_ns: int | None = None) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class LocalSide(Side):
    def __init__(self, side: ServerSide) -> None:
        self.side = side

    async def start(self) -> None:
        await self.side.start()
        self.endpoint = self.side.endpoint

    async def report(self, expected: int, timeout: float = 60.0) -> dict[str, Any]:
        return await self.side.report(expected, timeout)

    async def reset(self, origin_ns: int | None = None) -> None:
        self.side.reset(origin_ns)

    async def stop(self) -> None:
        await self.side.stop()


class _Progress(asyncio.Protocol):
    def __init__(self, window: Window) -> None:
        self.window = window

    def data_received(self, data: bytes) -> None:
        self.window.handled_some(len(data))


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Several serving processes' reports as one (the ledger's distinct counts add up: one queue, shared)."""
    merged = LatencyRecorder()
    for r in reports:
        merged.merge(LatencyRecorder.decode(r["hist"]))
    doc: dict[str, Any] = {
        "received": sum(int(r["received"]) for r in reports),
        "errors": sum(int(r["errors"]) for r in reports),
        "last_ns": max(int(r["last_ns"]) for r in reports),
        "hist": merged.encode(),
        "distinct": sum(int(r.get("distinct", 0)) for r in reports),
        "duplicates": sum(int(r.get("duplicates", 0)) for r in reports),
        "traced": sum(int(r.get("traced", 0)) for r in reports),
    }
    series: dict[str, list[Any]] = {}
    for r in reports:
        for second, (count, hist) in r.get("series", {}).items():
            entry = series.setdefault(second, [0, LatencyRecorder()])
            entry[0] += count
            entry[1].merge(LatencyRecorder.decode(hist))
    if any("series" in r for r in reports):
        doc["series"] = {s: [c, rec.encode()] for s, (c, rec) in series.items()}
    return doc


class GroupSide(Side):
    """Several worker processes on one queue, reported as one."""

    def __init__(self, sides: list[Side]) -> None:
        self.sides = sides

    async def start(self) -> None:
        for side in self.sides:
            await side.start()

    async def report(self, expected: int, timeout: float = 60.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            reports = [await side.report(0) for side in self.sides]
            received = sum(int(r["received"]) for r in reports)
            if received >= expected or loop.time() > end:
                break
            await asyncio.sleep(0.01)
        return merge_reports(reports)

    async def reset(self, origin_ns: int | None = None) -> None:
        for side in self.sides:
            await side.reset(origin_ns)

    async def stop(self) -> None:
        for side in reversed(self.sides):
            with contextlib.suppress(Exception):
                await side.stop()


class ChainSide(GroupSide):
    """The services of a chain, started last one first, each told where the next one listens."""

    def __init__(self, make: Any, roles: tuple[str, ...]) -> None:
        super().__init__([])
        self.make = make
        self.roles = roles

    async def start(self) -> None:
        following = ""
        for role in self.roles:
            side: Side = self.make(role, following)
            self.sides.append(side)
            await side.start()
            following = side.endpoint
        self.endpoint = following  # the first service's, where A calls

    async def report(self, expected: int, timeout: float = 60.0) -> dict[str, Any]:
        return merge_reports([await side.report(0) for side in self.sides])


class RemoteSide(Side):
    def __init__(self, scenario: str, options: ServerOptions, window: Window | None, loop: str = "asyncio") -> None:
        self.scenario = scenario
        self.options = options
        self.window = window
        self.loop = loop
        self.proc: asyncio.subprocess.Process | None = None
        self._transport: asyncio.BaseTransport | None = None

    @classmethod
    def with_role(cls, scenario: str, options: ServerOptions, loop: str, role: str, following: str) -> RemoteSide:
        return cls(scenario, dataclasses.replace(options, role=role, next_endpoint=following), None, loop)

    async def start(self) -> None:
        o = self.options
        pass_fds: tuple[int, ...] = ()
        extra: list[str] = []
        window = self.window
        if window is not None:
            read_fd, write_fd = os.pipe()
            pass_fds = (write_fd,)
            extra = ["--progress-fd", str(write_fd)]
            reader = os.fdopen(read_fd, "rb", buffering=0)
            self._transport, _ = await asyncio.get_running_loop().connect_read_pipe(lambda: _Progress(window), reader)
        if o.role:
            extra += ["--role", o.role]
        if o.next_endpoint:
            extra += ["--next", o.next_endpoint]
        if o.otel:
            extra += ["--otel", o.otel]
        args = [
            "-m", "amqpkit.bench.serve", *extra, self.scenario, "--queue", o.queue,
            "--prefetch", str(o.prefetch), "--queue-type", o.queue_type,
            "--stall-ms", str(o.stall_ms), "--stall-after", str(o.stall_after),
            "--service-ms", str(o.service_ms), "--deadline", str(o.deadline), "--loop", self.loop,
            "--task-cpu-ms", str(o.task_cpu_ms),
        ]  # fmt: skip
        # The URL holds the password: it goes in the environment, which only this user can read,
        # never on the command line, which `ps` shows to everyone.
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, pass_fds=pass_fds, env={**os.environ, "AMQP_URL": o.url},
        )  # fmt: skip
        for fd in pass_fds:
            os.close(fd)  # the child has it now
        # Its stderr is read all along (a full pipe would stop a process that logs), keeping the last lines.
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._stderr_reader = asyncio.ensure_future(self._drain_stderr())
        ready = await self._read(timeout=60)
        self.endpoint = str(ready.get("endpoint", ""))
        instrumented = bool(ready.get("instrumented"))
        if instrumented != (o.otel not in ("", "off")):
            raise RuntimeError(f"bench server for {self.scenario} is {'' if instrumented else 'not '}instrumented "
                               f"(--otel {o.otel or 'not given'})")  # fmt: skip

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            if text := line.decode(errors="replace").strip():
                self._stderr_tail.append(text)

    async def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_reader), 5)
            tail = self._stderr_tail[-1] if self._stderr_tail else "(nothing on stderr)"
            raise RuntimeError(f"bench server for {self.scenario} exited: {tail}")
        doc: dict[str, Any] = json.loads(line)
        return doc

    async def _command(self, command: str, timeout: float = 90) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._read(timeout)

    async def report(self, expected: int, timeout: float = 60.0) -> dict[str, Any]:
        return await self._command(f"report {expected} {timeout:g}", timeout=timeout + 30)

    async def reset(self, origin_ns: int | None = None) -> None:
        await self._command("reset" if origin_ns is None else f"reset {origin_ns}")

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"quit\n")
            await asyncio.wait_for(proc.stdin.drain(), 5)
            await asyncio.wait_for(proc.wait(), 15)
        except Exception:  # it did not stop when told: it is ended, whatever the reason
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
        finally:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._stderr_reader, 5)
