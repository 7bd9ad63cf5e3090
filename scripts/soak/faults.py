"""Faults, one every ``interval`` seconds, in rotation, and the wait for everything to come back after each.

1. ``connections-cut``: ``rabbitmqctl close_all_connections`` (every client at once, workers included);
2. ``broker-restart``: ``rabbitmqctl stop_app``, then ``start_app``;
3. ``worker-killed``: a worker process SIGKILLed (its unacked tasks go back to the queue), then restarted;
4. ``queue-deleted``: a subscriber's queue deleted under it (``rabbitmqctl delete_queue``), alternately
   the private subscription's and a durable one's; the Broker must declare it again and re-attach.

After each fault the :class:`Health` check waits until every connection is
up and every queue has exactly its consumers again; how long that took, or
that it did not happen within the limit, goes into the ledger.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from amqpkit import AmqpkitError, Broker
from soak.ledger import WindowOpen
from soak.load import (
    DURABLE_SUBSCRIBERS,
    PRIVATE_SUBSCRIBER,
    RPC_QUEUE,
    TASK_QUEUE,
    Clock,
    Journal,
    PubSub,
    Rpc,
    WorkerPool,
)
from soak.node import Ctl

KINDS = ("connections-cut", "broker-restart", "worker-killed", "queue-deleted")


class Health:
    """Is everything back? Every Broker connected, messages and calls getting through, each queue with its consumers."""

    def __init__(
        self, brokers: dict[str, Broker], control: Broker, pubsub: PubSub, rpc: Rpc, workers: WorkerPool
    ) -> None:
        self.brokers = brokers
        self.control = control
        self.pubsub = pubsub
        self.rpc = rpc
        self.workers = workers
        self.most_consumers: dict[str, int] = {}

    async def _consumers(self, broker: Broker, queue: Any) -> int | str:
        try:
            _, consumers = await asyncio.wait_for(broker.queue_counts(queue), 3)
        except (AmqpkitError, TimeoutError) as exc:
            return f"{type(exc).__name__}"
        return consumers

    async def problems(self, since: float) -> list[str]:
        found = [f"{name} disconnected" for name, b in self.brokers.items() if not b.is_connected]
        if found:
            return found
        # Each subscriber has received a message published after ``since``: it is back, end to end. (A
        # private queue is exclusive, so another connection cannot count its consumers; and looking
        # through the subscriber's own connection could close the channel it re-declares on.)
        for name in self.pubsub.subscribers:
            if self.pubsub.latest_published.get(name, -1.0) < since:
                found.append(f"{name}: nothing published after t={since:.1f} s received yet")
        if self.rpc.latest_ok < since:
            found.append(f"rpc: no call started after t={since:.1f} s has succeeded yet")
        wanted = [(name, queue, 1) for name, queue in DURABLE_SUBSCRIBERS.items()]
        wanted += [("workers", TASK_QUEUE, self.workers.size), ("rpc-server", RPC_QUEUE, 1)]
        for label, queue, want in wanted:
            got = await self._consumers(self.control, queue)
            if isinstance(got, int):
                self.most_consumers[label] = max(self.most_consumers.get(label, 0), got)
            if got != want:
                found.append(f"{label}: {got} consumers on {queue} (want {want})")
        return found

    async def wait(self, clock: Clock, limit: float) -> tuple[float | None, list[str]]:
        """Seconds until everything is back (None if not within ``limit``), and what was still wrong."""
        started = clock.now()
        problems: list[str] = []
        while clock.now() - started < limit:
            problems = await self.problems(started)
            if not problems:
                return clock.now() - started, []
            await asyncio.sleep(0.25)
        return None, problems


class Faults:
    def __init__(
        self,
        ctl: Ctl,
        clock: Clock,
        journal: Journal,
        pubsub: PubSub,
        workers: WorkerPool,
        health: Health,
        *,
        interval: float,
        recovery_limit: float,
    ) -> None:
        self.ctl = ctl
        self.clock = clock
        self.journal = journal
        self.pubsub = pubsub
        self.workers = workers
        self.health = health
        self.interval = interval
        self.recovery_limit = recovery_limit
        self.done: list[dict[str, Any]] = []
        self._deletes = 0
        self._kills = 0

    async def run(self, until: Callable[[], bool], last_start: float) -> None:
        """A fault every ``interval`` s, the first after one interval, none after ``last_start``."""
        n = 0
        while True:
            at = (n + 1) * self.interval
            if at > last_start:
                return
            while self.clock.now() < at:
                if until():
                    return
                await asyncio.sleep(min(0.2, at - self.clock.now()))
            await self.one(n + 1, KINDS[n % len(KINDS)])
            n += 1

    async def one(self, number: int, kind: str) -> None:
        record: dict[str, Any] = {"n": number, "kind": kind, "t": round(self.clock.now(), 3)}
        self.journal.add("faults", kind, n=number)
        self.journal.fault = number
        try:
            await getattr(self, "_" + kind.replace("-", "_"))(number, record)
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"[:500]
        record["took_s"] = round(self.clock.now() - record["t"], 3)
        recovered, problems = await self.health.wait(self.clock, self.recovery_limit)
        record["back_after_s"] = None if recovered is None else round(recovered + record["took_s"], 3)
        if problems:
            record["not_back"] = problems
            self.journal.add("faults", "not recovered", n=number, problems=problems)
        self.done.append(record)

    async def _connections_cut(self, number: int, record: dict[str, Any]) -> None:
        await self.ctl.run("close_all_connections", f"soak fault {number}: connection cut")

    async def _broker_restart(self, number: int, record: dict[str, Any]) -> None:
        started = self.clock.now()
        try:
            await self.ctl.run("stop_app", timeout=120)
        finally:
            await self.ctl.run("start_app", timeout=180)
        record["broker_down_s"] = round(self.clock.now() - started, 3)

    async def _worker_killed(self, number: int, record: dict[str, Any]) -> None:
        slot = self._kills % self.workers.size
        self._kills += 1
        record["pid"] = await self.workers.kill(slot)
        record["slot"] = slot

    async def _queue_deleted(self, number: int, record: dict[str, Any]) -> None:
        # Alternately the private subscription's queue and a durable one's.
        name = PRIVATE_SUBSCRIBER if self._deletes % 2 == 0 else "sub-2"
        self._deletes += 1
        sub = self.pubsub.subscribers[name]
        queue = sub.queue_name
        at = self.clock.now()
        out = await self.ctl.run("delete_queue", queue)
        after = self.clock.now()
        self.pubsub.windows.append(WindowOpen(name, at, "queue deleted", fault=number, after=after))
        record.update(subscriber=name, queue=queue, broker_said=out.strip().splitlines()[-1][:200])


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return None
    return {"min": round(min(values), 2), "max": round(max(values), 2)}
