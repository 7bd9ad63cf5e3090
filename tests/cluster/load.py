"""Load and ledgers for the cluster: confirmed publish + consume on a quorum queue, RPC at a fixed rate.

Used by the short CI tests (tests/cluster) and by the full fault runs (scripts/cluster_faults.py).
Every message carries its own id (``m-<n>``); the ledger compares the ids whose publish was
confirmed with the ids the consumer saw: lost = confirmed and never received, duplicated =
received more than once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from amqpkit import (
    AmqpkitError,
    Broker,
    BrokerSettings,
    Delivery,
    Envelope,
    Queue,
    QueueType,
    ReconnectPolicy,
    RpcClient,
    RpcServer,
)

ROOT = Path(__file__).resolve().parents[2]
# AMQPKIT_CLUSTER_SCRIPT: a copy of the script to run instead (a long run is then safe from edits to it).
SCRIPT = Path(os.environ.get("AMQPKIT_CLUSTER_SCRIPT") or ROOT / "scripts" / "cluster.sh")


# ---------------------------------------------------------------- the cluster


def cluster(*args: str, timeout: float = 300) -> str:
    """Run scripts/cluster.sh; its stdout. RuntimeError when it fails."""
    result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"cluster.sh {' '.join(args)} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


async def acluster(*args: str, timeout: float = 300) -> str:
    return await asyncio.to_thread(cluster, *args, timeout=timeout)


def urls() -> list[str]:
    """The cluster's AMQP URLs, node 1 first (AMQPKIT_CLUSTER_URLS, else scripts/cluster.sh urls)."""
    text = os.environ.get("AMQPKIT_CLUSTER_URLS") or cluster("urls")
    return [u.strip() for u in text.split(",") if u.strip()]


def settings(start: int = 1, **kw: Any) -> BrokerSettings:
    """Settings over the whole URL list, starting at node ``start`` (1-3)."""
    all_urls = urls()
    order = all_urls[start - 1 :] + all_urls[: start - 1]
    kw.setdefault("connect_timeout", 5)
    kw.setdefault("heartbeat", 10)
    kw.setdefault("publish_timeout", 30)
    kw.setdefault("reconnect", ReconnectPolicy(initial_delay=0.1, max_delay=1.0, jitter=0.1, connect_attempts=5))
    return BrokerSettings(urls=tuple(order), **kw)


def connected_node(broker: Broker) -> int:
    """The node (1-3) ``broker`` is connected to now: the position of its current URL in the cluster's list."""
    where = urlsplit(broker.current_url)  # without its password: matched by host and port
    nodes = [(u.hostname, u.port) for u in map(urlsplit, urls())]
    return nodes.index((where.hostname, where.port)) + 1


def running_nodes() -> list[int]:
    return [int(line.split()[1]) for line in cluster("status").splitlines() if " running " in line]


async def restore(timeout: float = 180) -> None:
    """Heal every cut and start every stopped node: the cluster as the tests expect to find it."""
    await acluster("heal")
    for n in (1, 2, 3):
        if n not in await asyncio.to_thread(running_nodes):
            await acluster("start", str(n), timeout=timeout)
    for n in (1, 2, 3):
        await acluster("ctl", str(n), "await_startup", "--timeout", "120", timeout=timeout)


def quorum(name: str) -> Queue:
    return Queue(name, type=QueueType.QUORUM)


async def wait_replicated(name: str, members: int = 3, timeout: float = 90) -> None:
    """Wait until quorum queue ``name`` has ``members`` replicas up, leader or follower (asked of node 2).

    A failover test's precondition is a queue replicated on all three nodes. Once, in CI, every
    publish after the kill was nacked for 10 minutes (85,344 nacks): the queue had no majority
    on the two nodes left, which is what a queue declared with fewer replicas would do (a quorum
    queue gets its replicas on the nodes running when it is declared). Not proven to be the
    cause; the tests now wait until three replicas are up, and say so if they never are.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    seen = "nothing"
    status = f'rabbit_quorum_queue:status(<<"/">>, <<"{name}">>).'  # one queue: others' state cannot stall it
    while loop.time() < end:
        try:
            out = await acluster("ctl", "2", "eval", status, timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            out, seen = "", str(exc)[-200:]
        states = re.findall(r'\{<<"Raft State">>,(\w+)\}', out)
        if states:
            seen = ", ".join(states)
        if sum(state in ("leader", "follower") for state in states) >= members:
            return
        await asyncio.sleep(1)
    raise AssertionError(f"quorum queue {name} never had {members} replicas online within {timeout} s: {seen}")


# ---------------------------------------------------------------- publish + consume


@dataclasses.dataclass
class Ledger:
    total: int
    confirmed: set[str] = dataclasses.field(default_factory=set)
    received: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    publish_errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    confirm_times: list[float] = dataclasses.field(default_factory=list)
    disconnects: list[float] = dataclasses.field(default_factory=list)
    reconnects: list[float] = dataclasses.field(default_factory=list)
    nodes_seen: list[int] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def lost(self) -> list[str]:
        return sorted(self.confirmed - set(self.received))

    @property
    def duplicated(self) -> int:
        return sum(c - 1 for c in self.received.values() if c > 1)

    def longest_gap(self, after: float = 0.0) -> float:
        """The longest time between two confirms (seconds), counting from ``after`` (monotonic)."""
        times = sorted(t for t in self.confirm_times if t >= after)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def reconnect_times(self) -> list[float]:
        """For each disconnect, the seconds until the next reconnect."""
        out = []
        for d in self.disconnects:
            later = [r for r in self.reconnects if r >= d]
            if later:
                out.append(round(min(later) - d, 3))
        return out

    def summary(self) -> dict[str, Any]:
        received_ids = set(self.received)
        return {
            "messages": self.total,
            "confirmed": len(self.confirmed),
            "received_unique": len(received_ids),
            "lost": len(self.lost),
            "lost_ids": self.lost[:50],
            "duplicated": self.duplicated,
            "received_not_confirmed": len(received_ids - self.confirmed),
            "publish_errors": dict(self.publish_errors),
            "disconnects": len(self.disconnects),
            "reconnect_seconds": self.reconnect_times(),
            "longest_confirm_gap_s": round(self.longest_gap(), 3),
            "nodes_connected": self.nodes_seen,
            "seconds": round(time.monotonic() - self.started, 1),
        }


class Load:
    """``total`` confirmed publishes (``workers`` at a time, at most ``rate``/s) and a consumer, on one Broker.

    A publish that raises is retried by the load with the same message id (as an application
    would); only a publish that returned counts as confirmed.
    """

    def __init__(self, broker: Broker, queue: Queue, total: int, *, workers: int = 16, rate: float | None = None):
        self.broker = broker
        self.queue = queue
        self.ledger = Ledger(total)
        self.workers = workers
        self.rate = rate
        self._next = 0
        self._consumer: Any = None
        broker.on_disconnect(lambda exc: self.ledger.disconnects.append(time.monotonic()))

        async def on_reconnect() -> None:
            self.ledger.reconnects.append(time.monotonic())
            self.ledger.nodes_seen.append(connected_node(broker))

        broker.on_reconnect(on_reconnect)

    async def _on_message(self, delivery: Delivery[bytes]) -> None:
        self.ledger.received[delivery.message_id or "?"] += 1
        # If the channel went with the node, the message comes again (a duplicate in the ledger).
        with contextlib.suppress(AmqpkitError):
            await delivery.ack()

    async def start_consumer(self) -> None:
        self.ledger.nodes_seen.append(connected_node(self.broker))
        self._consumer = await self.broker.consume(self.queue, self._on_message, prefetch=64)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while self._next < self.ledger.total:
            n = self._next
            self._next += 1
            if self.rate:
                due = self.ledger.started + n / self.rate
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)  # pacing the load, not synchronising
            envelope = Envelope(f"message {n}".encode(), message_id=f"m-{n}")
            while True:
                try:
                    await self.broker.publish(envelope, routing_key=self.queue.name, timeout=30)
                except AmqpkitError as exc:
                    self.ledger.publish_errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.2)  # back off before the application's own retry
                    continue
                self.ledger.confirmed.add(envelope.message_id or "")
                self.ledger.confirm_times.append(loop.time())
                break

    async def publish_all(self) -> None:
        await asyncio.gather(*(self._worker() for _ in range(self.workers)))

    async def drain(self, timeout: float = 120) -> bool:
        """Wait until every confirmed id was received (True), or ``timeout`` passed (False)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self.ledger.confirmed <= set(self.ledger.received):
            if loop.time() > end:
                return False
            await asyncio.sleep(0.1)
        return True

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.cancel()


# ---------------------------------------------------------------- RPC


@dataclasses.dataclass
class RpcLedger:
    calls: int = 0
    ok: int = 0
    wrong: int = 0
    hung: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    untyped: list[str] = dataclasses.field(default_factory=list)
    slowest_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "ok": self.ok,
            "wrong_results": self.wrong,
            "hung": self.hung,
            "errors": dict(self.errors),
            "untyped_errors": self.untyped[:20],
            "slowest_call_s": round(self.slowest_s, 3),
        }


class RpcLoad:
    """``rate`` calls/s of add(a, b) from a client Broker to a server Broker (a quorum request queue).

    Each call has ``timeout``; a call not ended ``timeout + grace`` seconds after it began counts as hung.
    """

    def __init__(self, client: Broker, server: Broker, queue: str, *, rate: float = 200, timeout: float = 5):
        self.client_broker = client
        # The request queue as RpcServer makes it by default (classic, not durable): when its node
        # goes, the server declares it again on the node it reconnects to.
        self.server = RpcServer(server, queue, concurrency=64)
        self.server.add("add", self._add)
        self.client = RpcClient(client, queue, timeout=timeout)
        self.rate = rate
        self.timeout = timeout
        self.ledger = RpcLedger()
        self._stop = asyncio.Event()
        self._calls: set[asyncio.Task[None]] = set()

    @staticmethod
    async def _add(numbers: dict[str, int]) -> int:
        return numbers["a"] + numbers["b"]

    async def _one(self, n: int) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout + 15):
                result = await self.client.call("add", {"a": n, "b": 1}, returns=int)
            if result == n + 1:
                self.ledger.ok += 1
            else:
                self.ledger.wrong += 1
        except TimeoutError as exc:
            if isinstance(exc, AmqpkitError):
                self.ledger.errors[type(exc).__name__] += 1
            else:
                self.ledger.hung += 1
        except AmqpkitError as exc:
            self.ledger.errors[type(exc).__name__] += 1
        except Exception as exc:  # counted as a failure of the contract
            self.ledger.untyped.append(f"{type(exc).__name__}: {exc}")
        self.ledger.slowest_s = max(self.ledger.slowest_s, time.monotonic() - started)

    async def __aenter__(self) -> RpcLoad:
        await self.server.start()
        await self.client.start()
        return self

    async def run(self) -> None:
        """Call at the rate until :meth:`finish`."""
        began = time.monotonic()
        n = 0
        while not self._stop.is_set():
            due = began + n / self.rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)  # pacing the calls
            if self._stop.is_set():
                break
            task = asyncio.create_task(self._one(n))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
            self.ledger.calls += 1
            n += 1

    async def finish(self) -> None:
        self._stop.set()
        while self._calls:  # the run loop may start one more call before it sees the stop
            await asyncio.wait(list(self._calls))

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        for task in list(self._calls):
            task.cancel()
        await self.client.close()
        await self.server.stop()
