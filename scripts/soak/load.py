"""The soak's load, through amqpkit's public API, recording everything the ledger needs.

Each part has Brokers (connections) of its own, as separate services would:

- :class:`PubSub`: one Publisher on a fanout exchange, three Subscribers: two
  on durable shared queues (``soak.sub.1``, ``soak.sub.2``), one private;
- :class:`Tasks`: a WorkQueue fed at a steady rate, and the worker
  processes (``amqpkit worker``) in :class:`WorkerPool`;
- :class:`Rpc`: an RpcServer and an RpcClient calling it at a steady rate,
  each call with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import IO, Any

from amqpkit import (
    AmqpkitError,
    Broker,
    BrokerSettings,
    Delivery,
    Exchange,
    ExchangeType,
    Publisher,
    RpcClient,
    RpcServer,
    Subscriber,
    WorkQueue,
)
from soak.ledger import Call, Sent, WindowOpen


class Clock:
    """Seconds since the soak's start (monotonic)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.monotonic()
        self.wall0 = time.time()  # the same instant on the wall clock, for other processes' records

    def now(self) -> float:
        return time.monotonic() - self.t0

    def of_wall(self, epoch: float) -> float:
        return round(epoch - self.wall0, 3)


class Journal:
    """What happened, in order: faults, connections lost and back, worker exits. Shown in the ledger."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.events: list[dict[str, Any]] = []
        self.fault: int | None = None  # the latest fault made, to name it in what follows

    def add(self, component: str, kind: str, **detail: Any) -> float:
        t = self.clock.now()
        self.events.append({"t": round(t, 3), "component": component, "event": kind, **detail})
        return t


def outcome_of(exc: BaseException) -> str:
    """An amqpkit error by its type name; anything else marked untyped."""
    if isinstance(exc, AmqpkitError):
        return type(exc).__name__
    return f"untyped:{type(exc).__name__}"


class ErrorSamples:
    """The first few errors of each kind, with their text; for an untyped one, where it came from."""

    def __init__(self, clock: Clock, keep: int = 3) -> None:
        self.clock = clock
        self.keep = keep
        self.samples: dict[str, list[dict[str, Any]]] = {}

    def add(self, outcome: str, exc: BaseException) -> None:
        kept = self.samples.setdefault(outcome, [])
        if len(kept) >= self.keep:
            return
        sample: dict[str, Any] = {"t_s": round(self.clock.now(), 3), "error": f"{type(exc).__name__}: {exc}"[:300]}
        if outcome.startswith("untyped:"):
            frames = traceback.extract_tb(exc.__traceback__)[-6:]
            sample["where"] = [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames]
        kept.append(sample)


class Spawner:
    """Starts coroutines as tasks and keeps a reference to each until it is done."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def drain(self, timeout: float) -> int:
        """Wait for every task up to ``timeout``; cancel the rest; returns how many had to be cancelled."""
        pending = set(self.tasks)
        if not pending:
            return 0
        _, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=5)
        return len(late)


async def paced(rate: float, until: Callable[[], bool], clock: Clock, fire: Callable[[int], None]) -> int:
    """Call ``fire(n)`` ``rate`` times a second until ``until()``; never bursts to catch up more than a second."""
    interval = 1.0 / rate
    n = 0
    next_t = clock.now()
    while not until():
        fire(n)
        n += 1
        next_t += interval
        delay = next_t - clock.now()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1.0:
            next_t = clock.now()
    return n


class Brokers:
    """The soak's connections, each named, each reporting losses and reconnects to the journal."""

    def __init__(self, url: str, journal: Journal, stack: AsyncExitStack) -> None:
        self.url = url
        self.journal = journal
        self.stack = stack
        self.all: dict[str, Broker] = {}
        self.on_lost: dict[str, list[Callable[[float], None]]] = {}

    async def open(self, name: str) -> Broker:
        broker = Broker(BrokerSettings(url=self.url, connection_name=f"soak-{name}"))
        await self.stack.enter_async_context(broker)
        self.all[name] = broker

        def lost(exc: BaseException) -> None:
            t = self.journal.add(name, "connection lost", reason=str(exc)[:200])
            for callback in self.on_lost.get(name, []):
                callback(t)

        async def back() -> None:
            self.journal.add(name, "reconnected")

        broker.on_disconnect(lost)
        broker.on_reconnect(back)
        return broker


# ---------------------------------------------------------------------- pub/sub

EVENTS = Exchange("soak.events", type=ExchangeType.FANOUT)
DURABLE_SUBSCRIBERS = {"sub-1": "soak.sub.1", "sub-2": "soak.sub.2"}
PRIVATE_SUBSCRIBER = "sub-3"


class PubSub:
    def __init__(self, clock: Clock, journal: Journal, rate: float, max_inflight: int = 2000) -> None:
        self.clock = clock
        self.journal = journal
        self.rate = rate
        self.max_inflight = max_inflight
        self.sent: list[Sent] = []
        self.arrivals: dict[str, dict[str, list[float]]] = {}
        self.windows: list[WindowOpen] = []
        self.by_id: dict[str, Sent] = {}
        self.latest_published: dict[str, float] = {}  # per subscriber: latest publish start among what it got
        self.subscribers: dict[str, Subscriber[Any]] = {}
        self.brokers: dict[str, Broker] = {}
        self.not_sent_backpressure = 0
        self.errors = ErrorSamples(clock)
        self.gave_up: list[str] = []
        self._spawner = Spawner()
        self._publisher: Publisher[Any] | None = None

    async def start(self, brokers: Brokers, stack: AsyncExitStack) -> None:
        self._publisher = Publisher(await brokers.open("publisher"), EVENTS)
        await self._publisher.declare()
        names: dict[str, str | None] = {**DURABLE_SUBSCRIBERS, PRIVATE_SUBSCRIBER: None}
        for name, queue in names.items():
            broker = await brokers.open(name)
            self.brokers[name] = broker
            self.arrivals[name] = {}
            sub: Subscriber[Any] = Subscriber(
                broker, EVENTS, self._handler(name), queue=queue, on_error=self._gave_up(name)
            )
            await stack.enter_async_context(sub)
            self.subscribers[name] = sub
        # A private subscription's queue dies with its connection: what is routed meanwhile is missed.
        brokers.on_lost.setdefault(PRIVATE_SUBSCRIBER, []).append(
            lambda t: self.windows.append(
                WindowOpen(PRIVATE_SUBSCRIBER, t, "connection lost", fault=self.journal.fault)
            )
        )

    def _handler(self, name: str) -> Callable[[Delivery[dict[str, Any]]], Awaitable[None]]:
        got = self.arrivals[name]
        clock = self.clock
        by_id = self.by_id
        latest = self.latest_published

        async def on_event(delivery: Delivery[dict[str, Any]]) -> None:
            message_id = delivery.message_id or str(delivery.value.get("id"))
            got.setdefault(message_id, []).append(clock.now())
            sent = by_id.get(message_id)
            if sent is not None and sent.start > latest.get(name, -1.0):
                latest[name] = sent.start

        return on_event

    def _gave_up(self, name: str) -> Callable[[BaseException], None]:
        def on_error(exc: BaseException) -> None:
            self.gave_up.append(f"{name}: {type(exc).__name__}: {exc}")
            self.journal.add(name, "subscriber gave up", error=f"{type(exc).__name__}: {exc}"[:300])

        return on_error

    def fire(self, n: int) -> None:
        if len(self._spawner.tasks) >= self.max_inflight:
            self.not_sent_backpressure += 1
            return
        record = Sent(id=f"e{n:07d}", start=self.clock.now())
        self.sent.append(record)
        self.by_id[record.id] = record
        self._spawner.spawn(self._publish(record, n))

    async def _publish(self, record: Sent, n: int) -> None:
        assert self._publisher is not None
        try:
            await self._publisher.publish({"id": record.id, "n": n}, message_id=record.id)
            record.outcome = "confirmed"
        except Exception as exc:
            record.outcome = outcome_of(exc)
            self.errors.add(record.outcome, exc)
        record.end = self.clock.now()

    async def finish(self, timeout: float) -> int:
        return await self._spawner.drain(timeout)


# ---------------------------------------------------------------------- work queue

TASK_QUEUE = "soak.tasks"


def draw_plan(rng: random.Random, failure_rate: float) -> dict[str, Any]:
    """A task's fate: most succeed; ``failure_rate`` fail: 60 % of those recover after 1-3 failures,
    20 % fail on every attempt (to the DLQ after the last), 20 % are rejected (to the DLQ at once)."""
    r = rng.random()
    work_ms = rng.randint(5, 40)
    if r >= failure_rate:
        return {"work_ms": work_ms}
    r /= failure_rate
    if r < 0.6:
        return {"work_ms": work_ms, "fail_times": rng.randint(1, 3)}
    if r < 0.8:
        return {"work_ms": work_ms, "fatal": "fail"}
    return {"work_ms": work_ms, "fatal": "reject"}


class Tasks:
    def __init__(self, clock: Clock, journal: Journal, rate: float, failure_rate: float, seed: int) -> None:
        self.clock = clock
        self.journal = journal
        self.rate = rate
        self.failure_rate = failure_rate
        self.rng = random.Random(seed)
        self.sent: list[Sent] = []
        self.errors = ErrorSamples(clock)
        self.not_sent_backpressure = 0
        self._spawner = Spawner()
        self._queue: WorkQueue[Any] | None = None
        self.broker: Broker | None = None

    async def start(self, brokers: Brokers) -> None:
        self.broker = await brokers.open("producer")
        self._queue = WorkQueue(self.broker, TASK_QUEUE)
        await self._queue.declare()

    def fire(self, n: int) -> None:
        if len(self._spawner.tasks) >= 2000:
            self.not_sent_backpressure += 1
            return
        record = Sent(id=f"t{n:06d}", start=self.clock.now(), plan=draw_plan(self.rng, self.failure_rate))
        self.sent.append(record)
        self._spawner.spawn(self._enqueue(record))

    async def _enqueue(self, record: Sent) -> None:
        assert self._queue is not None
        try:
            await self._queue.enqueue({"id": record.id, **record.plan}, task_id=record.id)
            record.outcome = "confirmed"
        except Exception as exc:
            record.outcome = outcome_of(exc)
            self.errors.add(record.outcome, exc)
        record.end = self.clock.now()

    async def finish(self, timeout: float) -> int:
        return await self._spawner.drain(timeout)

    async def dead_letters(self) -> list[dict[str, Any]]:
        """What the DLQ holds now, read with amqpkit's own DLQ listing (which leaves it as it was)."""
        from amqpkit.patterns.dlq import list_dead_letters

        assert self.broker is not None
        letters = await list_dead_letters(self.broker, TASK_QUEUE)
        return [{"task_id": d.task_id, "reason": d.reason, "attempts": d.attempts, "error": d.error} for d in letters]


def read_journals(folder: Path) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for path in sorted(folder.glob("journal-*.jsonl")):
        for text in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(text))
    return lines


SCRIPTS = str(Path(__file__).resolve().parents[1])  # where the soak package is, for the workers' PYTHONPATH


def _open_log(path: Path) -> IO[bytes]:
    return open(path, "ab")  # handed to the child, closed by the caller


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the soak itself dies (Linux), so no worker outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class WorkerPool:
    """``amqpkit worker`` processes over the soak's work queue; one dying unbidden is restarted and reported."""

    def __init__(
        self,
        url: str,
        folder: Path,
        journal: Journal,
        size: int,
        *,
        concurrency: int,
        max_attempts: int,
        retry_delay: float,
    ) -> None:
        self.url = url
        self.folder = folder
        self.journal = journal
        self.size = size
        self.argv = [
            str(Path(sys.executable).with_name("amqpkit")),
            "worker",
            "soak.task_handler:handle",
            "--queue",
            TASK_QUEUE,
            "--concurrency",
            str(concurrency),
            "--max-attempts",
            str(max_attempts),
            "--retry-delay",
            str(retry_delay),
            "--grace",
            "5",
        ]
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.expected_exit: set[int] = set()
        self.generation = 0
        self.unexpected_exits: list[dict[str, Any]] = []
        self.stopping = False
        self._watchers = Spawner()
        (folder / "pids").mkdir(exist_ok=True)

    async def start(self) -> None:
        for slot in range(self.size):
            await self._spawn(slot)

    async def _spawn(self, slot: int) -> None:
        self.generation += 1
        tag = f"{slot}-{self.generation}"
        env = {**os.environ, "AMQP_URL": self.url, "SOAK_JOURNAL": str(self.folder / f"journal-{tag}.jsonl")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SCRIPTS, os.environ.get("PYTHONPATH")) if p)
        log = _open_log(self.folder / f"worker-{tag}.log")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        self.procs[slot] = proc
        (self.folder / "pids" / str(proc.pid)).write_text(f"worker {tag}\n")
        self.journal.add(f"worker-{slot}", "started", pid=proc.pid, log=f"worker-{tag}.log")
        self._watchers.spawn(self._watch(slot, proc, tag))

    async def _watch(self, slot: int, proc: asyncio.subprocess.Process, tag: str) -> None:
        code = await proc.wait()
        with contextlib.suppress(OSError):
            (self.folder / "pids" / str(proc.pid)).unlink()
        if proc.pid in self.expected_exit or self.stopping:
            return
        tail = (self.folder / f"worker-{tag}.log").read_text(errors="replace").strip().splitlines()[-5:]
        record = {"slot": slot, "pid": proc.pid, "code": code, "last_lines": [line[:300] for line in tail]}
        self.unexpected_exits.append(record)
        self.journal.add(f"worker-{slot}", "exited unbidden", pid=proc.pid, code=code)
        await asyncio.sleep(1)
        if not self.stopping and self.procs.get(slot) is proc:
            await self._spawn(slot)

    async def kill(self, slot: int) -> int:
        """SIGKILL the worker in ``slot``, then start another in its place; returns the killed pid."""
        proc = self.procs[slot]
        self.expected_exit.add(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        await asyncio.sleep(1.0)
        await self._spawn(slot)
        return proc.pid

    def live(self) -> int:
        return sum(1 for p in self.procs.values() if p.returncode is None)

    async def stop(self) -> None:
        """SIGTERM every worker (they finish or requeue, then exit 0); SIGKILL what is left after 20 s."""
        self.stopping = True
        procs = [p for p in self.procs.values() if p.returncode is None]
        for p in procs:
            self.expected_exit.add(p.pid)
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        waiting = [asyncio.ensure_future(p.wait()) for p in procs]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=20)
            for p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            if late:
                await asyncio.wait(late, timeout=5)
        await self._watchers.drain(5)

    def kill_all_now(self) -> None:
        """Last resort (synchronous): SIGKILL every worker still running."""
        for p in self.procs.values():
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)

    def error_lines(self, limit: int = 15) -> dict[str, Any]:
        """ERROR lines in the workers' logs: how many, and the distinct kinds (ids and numbers blurred)."""
        import re

        count = 0
        kinds: dict[str, int] = {}
        for path in sorted(self.folder.glob("worker-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if "ERROR" not in line and "Traceback" not in line:
                    continue
                if "by plan" in line:
                    continue  # the planned failures, logged by the worker as it dead-letters them
                count += 1
                kind = re.sub(r"\b(t\d{6}|\d[\d.]*)\b", "#", line.split("ERROR", 1)[-1].strip())[:200]
                kinds[kind] = kinds.get(kind, 0) + 1
        top = sorted(kinds.items(), key=lambda kv: -kv[1])[:limit]
        return {"count": count, "kinds": [{"line": k, "times": n} for k, n in top]}


# ---------------------------------------------------------------------- RPC

RPC_QUEUE = "soak.rpc"


class Rpc:
    def __init__(self, clock: Clock, rate: float, timeout: float, margin: float) -> None:
        self.clock = clock
        self.rate = rate
        self.timeout = timeout
        self.margin = margin
        self.calls: list[Call] = []
        self.errors = ErrorSamples(clock)
        self.served: dict[int, int] = {}
        self.latest_ok = -1.0  # start of the latest call that succeeded
        self._spawner = Spawner()
        self._client: RpcClient | None = None

    async def start(self, brokers: Brokers, stack: AsyncExitStack) -> None:
        server = RpcServer(await brokers.open("rpc-server"), RPC_QUEUE)
        served = self.served

        async def double(request: dict[str, Any]) -> dict[str, Any]:
            n = int(request["n"])
            served[n] = served.get(n, 0) + 1
            return {"n": n, "twice": 2 * n}

        server.add("double", double)
        await stack.enter_async_context(server)
        self._client = RpcClient(await brokers.open("rpc-client"), RPC_QUEUE, timeout=self.timeout)
        await stack.enter_async_context(self._client)

    def fire(self, n: int) -> None:
        call = Call(n=n, start=self.clock.now(), timeout=self.timeout)
        self.calls.append(call)
        self._spawner.spawn(self._call(call))

    async def _call(self, call: Call) -> None:
        assert self._client is not None
        try:
            # A hard stop well past the deadline, so the soak itself always ends; the ledger flags it.
            async with asyncio.timeout(self.timeout + self.margin + 30):
                result = await self._client.call("double", {"n": call.n}, timeout=self.timeout)
            call.outcome = "ok" if result == {"n": call.n, "twice": 2 * call.n} else "wrong-result"
            if call.outcome == "ok":
                self.latest_ok = max(self.latest_ok, call.start)
        except TimeoutError as exc:
            call.outcome = type(exc).__name__ if isinstance(exc, AmqpkitError) else "did-not-end"
            self.errors.add(call.outcome, exc)
        except Exception as exc:
            call.outcome = outcome_of(exc)
            self.errors.add(call.outcome, exc)
        call.end = self.clock.now()

    async def finish(self) -> int:
        cancelled = await self._spawner.drain(self.timeout + self.margin + 35)
        for call in self.calls:
            if math.isnan(call.end):
                call.outcome = "did-not-end"
        return cancelled

    def served_twice(self) -> int:
        return sum(1 for n in self.served.values() if n > 1)
