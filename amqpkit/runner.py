"""Run a service until SIGINT or SIGTERM, then let it shut down gracefully.

``run_until_signal(main)`` calls ``main(stop)`` with an :class:`asyncio.Event`
that is set on the first SIGINT/SIGTERM; ``main`` waits on it, cleans up and
returns. A second signal cancels ``main``. No traceback reaches the terminal
for a signal: the process exits 0 (or what ``main`` returned).

:func:`serve` runs a :class:`~amqpkit.service.Service` that way (what
``amqpkit run`` and ``amqpkit worker`` do): health endpoints, readiness, and
an :class:`Outcome` saying how it ended. :func:`supervise` runs N copies of a
command as child processes (``amqpkit run --processes N``), forwards the stop
to them and reports their readiness as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ._aio import first_of
from .executors import RunningCall
from .health import HealthServer
from .service import RunningService, Service, ServiceError
from .settings import BrokerSettings

__all__ = ["Outcome", "RunOptions", "run_until_signal", "serve", "supervise"]

log = logging.getLogger("amqpkit.runner")

Main = Callable[[asyncio.Event], Awaitable[int | None]]

# Exit codes of `amqpkit run` (and `amqpkit worker`).
EXIT_OK = 0
EXIT_FAILED = 1  # a consumer or declared topology could not be restored, the broker stayed away, a startup error
EXIT_USAGE = 2  # bad MODULE:ATTR, a service whose declarations do not add up, no broker to connect to
EXIT_ABANDONED = 3  # stopped, but plain def handlers were still running when the grace ran out (left unfinished)


def run_until_signal(main: Main) -> int:
    """Run ``main(stop)`` in a new event loop; returns its exit code (0 when it returns None)."""
    # Tutorials and workers print progress that a pipe must see at once.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return asyncio.run(_supervise(main))
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0


async def _supervise(main: Main) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.ensure_future(main(stop))

    def on_signal() -> None:
        if stop.is_set():
            task.cancel()
        stop.set()

    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    try:
        result = await task
    except asyncio.CancelledError:
        return 0
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return int(result or 0)


# ---------------------------------------------------------------------- one service in this process


@dataclass(frozen=True)
class RunOptions:
    """How a service runs: ``grace`` seconds for running handlers at a stop; health endpoints; when to give up."""

    grace: float = 30.0
    health_port: int | None = None
    health_host: str = "127.0.0.1"
    give_up_after: float | None = None


@dataclass
class Outcome:
    """How a run ended: the exit code, and the reason when it is not 0.

    ``abandoned``: the plain ``def`` handler calls still running in their threads when the grace ran out; the
    process cannot end normally while they run (the interpreter waits for them at exit).
    """

    code: int
    reason: str | None = None
    running: RunningService | None = None
    abandoned: list[RunningCall] = field(default_factory=list)


async def _health_server(readiness: Callable[[], tuple[bool, str | None]], options: RunOptions) -> HealthServer:
    """The health endpoints, started; a port that cannot be taken (another process has it) is a start error."""
    try:
        return await HealthServer(readiness, host=options.health_host, port=options.health_port or 0).start()
    except OSError as exc:
        raise ServiceError(f"cannot serve the health endpoints on {options.health_host}:{options.health_port}: "
                           f"{exc.strerror or exc}") from None  # fmt: skip


async def serve(
    service: Service,
    stop: asyncio.Event,
    *,
    settings: BrokerSettings | None = None,
    options: RunOptions = RunOptions(),
    on_started: Callable[[RunningService], None] | None = None,
    on_change: Callable[[bool, str | None], None] | None = None,
) -> Outcome:
    """Run ``service`` until ``stop`` is set or it fails; then stop it within ``options.grace``.

    Startup errors (no broker, a refused declaration, a wrong service) raise.
    Returns code 0 after a clean stop, 1 with the reason when the service
    failed (a consumer or declared topology that could not be restored, or
    the broker unreachable for ``give_up_after`` seconds).
    """
    running = RunningService(service, settings=settings, give_up_after=options.give_up_after)
    health: HealthServer | None = None
    if options.health_port is not None:
        health = await _health_server(running.readiness, options)
    try:
        if on_change is not None:
            last: list[tuple[bool, str | None]] = []

            def changed() -> None:
                state = running.readiness()
                if not last or last[-1] != state:
                    last[:] = [state]
                    on_change(*state)

            running.on_change(changed)
            changed()
        # A stop during the start (a startup hook waiting for a database, a broker not up yet) ends the start:
        # cancelled, it takes down what it began (RunningService.start), and no handler is attached after it.
        starting = asyncio.ensure_future(running.start())
        try:
            await first_of(starting, stop.wait())
        except asyncio.CancelledError:  # a second signal: the start ends as well
            starting.cancel()
            await asyncio.wait({starting})
            raise
        if not starting.done():
            log.info("service %s: stop asked during its start; the start is cancelled", service.name)
            starting.cancel()
            await asyncio.wait({starting})
        if starting.cancelled():
            log.info("service %s stopped before it started", service.name)
            return Outcome(EXIT_OK, None, running)
        starting.result()  # a startup error raises, as before
        if on_started is not None:
            on_started(running)
        await first_of(stop.wait(), running.wait_failed())
        await running.stop(grace=options.grace)
    finally:
        if health is not None:
            await health.close()
    # A plain def handler still running once the grace is over cannot be stopped (a thread cannot be): it is
    # left to the process's end, its message unacknowledged, so the broker delivers it again.
    left = running._calls_left()
    for call in left:
        log.error("%s: still running when the grace of %g s ran out; left unfinished and unacknowledged, its "
                  "message goes back to the queue", call.describe(), options.grace)  # fmt: skip
    if running.error is not None:
        return Outcome(EXIT_FAILED, running.error, running, left)
    if left:
        few = "; ".join(call.describe() for call in left[:3]) + ("; ..." if len(left) > 3 else "")
        why = f"{len(left)} handler call{'s' if len(left) > 1 else ''} still running after the grace ({few})"
        return Outcome(EXIT_ABANDONED, why, running, left)
    return Outcome(EXIT_OK, None, running)


# ---------------------------------------------------------------------- N copies in child processes


async def supervise(
    argv: Sequence[str],
    processes: int,
    stop: asyncio.Event,
    *,
    env: Mapping[str, str] | None = None,
    options: RunOptions = RunOptions(),
    status_flag: str = "--status-fd",
) -> Outcome:
    """Run ``processes`` copies of ``argv`` (each given ``status_flag FD``) until ``stop``, or until one exits.

    Each child reports its readiness as JSON lines on that descriptor (see
    :class:`StatusReporter`) and stops by itself if this process goes away
    (the descriptor reaches end of file). On ``stop`` every child gets
    SIGTERM and ``options.grace`` seconds (plus a margin) before SIGKILL.
    The health endpoints, if any, are served here: ready while every child
    is. The code is 0 when every child stopped cleanly (a child that ended of
    the SIGTERM sent to it, still starting, stopped cleanly), else the first
    failure's: its exit code, or 1 for a child killed by another signal.
    """
    children: list[_Child] = []
    health: HealthServer | None = None

    def readiness() -> tuple[bool, str | None]:
        waiting = [f"process {c.index} (pid {c.pid}): {c.reason or 'starting'}" for c in children if not c.ready]
        if len(children) < processes:
            waiting.append("starting processes")
        return (not waiting, "; ".join(waiting) or None)

    if options.health_port is not None:
        health = await _health_server(readiness, options)
    try:
        for index in range(1, processes + 1):
            children.append(await _Child.start(index, argv, env, status_flag))
        log.info("started %d processes: %s", processes, ", ".join(str(c.pid) for c in children))
        exits = {asyncio.ensure_future(c.proc.wait()): c for c in children}
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({stopping, *exits}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        first: _Child | None = None
        if stopping not in done:
            first = next(exits[d] for d in done)
            log.error("process %d (pid %d) %s; stopping the others", first.index, first.pid, first.ended())
        await asyncio.gather(*(c.end(options.grace + 15) for c in children))
    finally:
        for child in children:
            await child.end(0)
        if health is not None:
            await health.close()
    if first is not None:
        return Outcome(first.code() or EXIT_FAILED, f"process {first.index} (pid {first.pid}) {first.ended()}")
    failed = [c for c in children if c.code()]
    if failed:
        c = failed[0]
        return Outcome(c.code(), f"process {c.index} (pid {c.pid}) {c.ended()}")
    return Outcome(EXIT_OK)


class _Child:
    def __init__(self, index: int, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self.index = index
        self.proc = proc
        self.pid = proc.pid
        self.sock = sock
        self.ready = False
        self.reason: str | None = "starting"
        self.terminated = False  # this process sent it SIGTERM (the stop it forwards)
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, index: int, argv: Sequence[str], env: Mapping[str, str] | None, status_flag: str) -> _Child:
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, status_flag, str(theirs.fileno()), pass_fds=(theirs.fileno(),),
                env=dict(env) if env is not None else None,
                start_new_session=True,  # a Ctrl-C reaches this process only; it forwards the stop
            )  # fmt: skip
        finally:
            theirs.close()
        child = cls(index, proc, ours)
        child._reader = asyncio.get_running_loop().create_task(child._read())
        return child

    def code(self) -> int:
        """Its part in the supervisor's exit code: 0, its own exit code, or 1 for a death by a signal.

        A child that ended of the SIGTERM forwarded to it (one still importing the service has no handler for
        it yet) stopped cleanly: 0. Another signal (a SIGKILL: ours past the grace, an OOM killer's) is a
        failure, 1: a negative return code is never an exit status.
        """
        code = self.proc.returncode
        if code is None or code >= 0:
            return code or 0
        return EXIT_OK if self.terminated and code == -signal.SIGTERM else EXIT_FAILED

    def ended(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    async def _read(self) -> None:
        reader, writer = await asyncio.open_connection(sock=self.sock)
        try:
            async for line in reader:
                try:
                    doc = json.loads(line)
                    self.ready, self.reason = bool(doc["ready"]), doc.get("reason")
                except (ValueError, KeyError, TypeError):
                    continue
        finally:
            self.ready, self.reason = False, "exited"
            writer.close()

    async def end(self, grace: float) -> None:
        """SIGTERM, ``grace`` seconds, then SIGKILL; returns once the process has exited."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
                self.terminated = True
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._reader is not None and grace == 0:
            self._reader.cancel()


class StatusReporter:
    """The child's side of :func:`supervise`: readiness up the descriptor, and ``stop`` set if the parent goes."""

    def __init__(self, fd: int, stop: asyncio.Event) -> None:
        self.sock = socket.socket(fileno=fd)
        self.stop = stop
        self._writer: asyncio.StreamWriter | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> StatusReporter:
        reader, self._writer = await asyncio.open_connection(sock=self.sock)
        self._watch = asyncio.get_running_loop().create_task(self._parent_gone(reader))
        return self

    async def _parent_gone(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()  # the parent never writes: this returns at end of file
        if not self.stop.is_set():
            log.warning("the supervising process went away (pid %d was our parent): stopping", os.getppid())
            self.stop.set()

    def report(self, ready: bool, reason: str | None) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps({"ready": ready, "reason": reason}).encode() + b"\n")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._writer is not None:
            self._writer.close()
