"""What every benchmark scenario is made of: a serving side, a driving side, their options.

The serving side (RPC server, consumer, HTTP or gRPC server, a service of a
chain) runs in its own process by default, as a real service would
(``python -m amqpkit.bench.serve``), or in the driver's event loop with
``inproc``. One-way latency is measured by the consumer, from the send time
carried in the message (``t``, monotonic nanoseconds; both processes share
the machine's monotonic clock) to the moment the handler runs; a call's
latency by the caller, for the full round trip. In open-loop mode the send
time is the *intended* one, so a stall delays every message scheduled behind
it and shows in the percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .stats import LatencyRecorder

__all__ = [
    "SEND_TIME", "SEQUENCE", "WARMUP", "ClientOptions", "ClientSide", "Kind", "ServerOptions", "ServerSide",
    "Window",
]  # fmt: skip

SEND_TIME = "t"
WARMUP = "w"
SEQUENCE = "n"


class Kind(StrEnum):
    """How a scenario is measured.

    - ``call``: the caller waits for the answer and measures the round trip;
      past its deadline the call fails (RPC over AMQP, HTTP, gRPC, the RPC chains).
    - ``oneway``: the sender does not wait; the consumer measures, and counts
      what it got (the ledger).
    - ``events``: the sender does not wait for the work, but is told when the
      last step has happened (the event chain); it measures end to end and
      counts what came back.
    """

    CALL = "call"
    ONEWAY = "oneway"
    EVENTS = "events"


@dataclass(frozen=True, slots=True)
class ServerOptions:
    url: str
    queue: str
    prefetch: int = 256
    queue_type: str = "classic"
    stall_ms: int = 0
    stall_after: int = 0
    progress_fd: int | None = None
    service_ms: float = 0.0
    role: str = ""
    next_endpoint: str = ""
    deadline: float = 30.0
    task_cpu_ms: float = 0.0
    otel: str = ""  # --otel mode of this serving process ("": not set up)


@dataclass(frozen=True, slots=True)
class ClientOptions:
    url: str
    queue: str
    size: int
    queue_type: str = "classic"
    endpoint: str = ""
    deadline: float = 30.0
    prefetch: int = 256


class Window:
    """The driver's view of one-way messages in flight: sent, and not yet handled by the consumer."""

    def __init__(self) -> None:
        self.sent = 0
        self.handled = 0
        self._moved = asyncio.Event()

    def handled_some(self, count: int = 1) -> None:
        self.handled += count
        self._moved.set()

    async def acquire(self, limit: int) -> None:
        while self.sent - self.handled >= limit:
            self._moved.clear()
            await self._moved.wait()
        self.sent += 1


# --------------------------------------------------------------------- serving side


class ServerSide(ABC):
    """The serving half: starts, counts what it handled, reports, resets between runs."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.recorder = LatencyRecorder()
        self.received = 0
        self.errors = 0
        self.last_ns = 0
        self.seen: set[int] = set()
        self.duplicates = 0
        self.traced = 0
        self.origin_ns: int | None = None
        self.series: dict[int, tuple[list[int], LatencyRecorder]] = {}
        self._handled_total = 0
        self._stalled = False
        self._limit = asyncio.Semaphore(max(1, options.prefetch)) if options.service_ms > 0 else None
        self.on_handled: Callable[[], None] | None = None
        if options.progress_fd is not None:
            fd = options.progress_fd
            self.on_handled = lambda: _tell(fd)

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @property
    def endpoint(self) -> str:
        """Where clients reach this side outside the broker (``host:port``), if they do."""
        return ""

    async def maybe_stall(self) -> None:
        """Stall once for ``stall_ms`` after ``stall_after`` messages (for testing that stalls are seen)."""
        self._handled_total += 1
        o = self.options
        if o.stall_ms and not self._stalled and self._handled_total > o.stall_after:
            self._stalled = True
            await asyncio.sleep(o.stall_ms / 1000)

    async def work(self, *, in_slot: bool = False) -> None:
        """The handler's own work: ``service_ms`` of waiting (like a database call), ``prefetch`` at once.

        ``in_slot``: the caller holds a :meth:`slot` already (a service that keeps it while it waits
        for the next one downstream, as a server with a pool of ``prefetch`` workers does).
        """
        await self.maybe_stall()
        if self._limit is None:
            return
        if in_slot:
            await asyncio.sleep(self.options.service_ms / 1000)
            return
        async with self._limit:
            await asyncio.sleep(self.options.service_ms / 1000)

    def slot(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """One of the ``prefetch`` places for a request being handled (none needed without ``service_ms``)."""
        return self._limit if self._limit is not None else contextlib.nullcontext()

    def observe(self, headers: Any) -> None:
        """Record a one-way message's latency from its headers (warm-up messages are not counted)."""
        now = time.monotonic_ns()
        if self.on_handled is not None:
            self.on_handled()
        if headers and headers.get(WARMUP):
            return
        sent = headers.get(SEND_TIME) if headers else None
        if isinstance(sent, int):
            self.recorder.record_ns(now - sent)
            if self.origin_ns is not None:
                self._in_series(now, now - sent)
        else:
            self.errors += 1
        sequence = headers.get(SEQUENCE) if headers else None
        if isinstance(sequence, int):
            if sequence in self.seen:
                self.duplicates += 1
            else:
                self.seen.add(sequence)
        if headers and "traceparent" in headers:  # the sender was instrumented (amqpkit bench --otel)
            self.traced += 1
        self.received += 1
        self.last_ns = now

    def _in_series(self, now: int, latency_ns: int) -> None:
        assert self.origin_ns is not None
        second = max(0, (now - self.origin_ns) // 1_000_000_000)
        entry = self.series.get(second)
        if entry is None:
            entry = self.series[second] = ([0], LatencyRecorder())
        entry[0][0] += 1
        entry[1].record_ns(latency_ns)

    def reset(self, origin_ns: int | None = None) -> None:
        """Forget what was measured; with ``origin_ns``, also count per second from then on."""
        self.recorder = LatencyRecorder()
        self.received = 0
        self.errors = 0
        self.last_ns = 0
        self.seen = set()
        self.duplicates = 0
        self.traced = 0
        self.origin_ns = origin_ns
        self.series = {}

    async def report(self, expected: int, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until ``expected`` measured messages arrived (one-way) or return at once (calls)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.received < expected and loop.time() < end:  # noqa: ASYNC110 - polling a counter
            await asyncio.sleep(0.005)
        doc: dict[str, Any] = {
            "received": self.received,
            "errors": self.errors,
            "last_ns": self.last_ns,
            "hist": self.recorder.encode(),
            "distinct": len(self.seen),
            "duplicates": self.duplicates,
            "traced": self.traced,
        }
        if self.origin_ns is not None:
            doc["series"] = {str(s): [c[0], r.encode()] for s, (c, r) in sorted(self.series.items())}
        return doc


def _tell(fd: int) -> None:
    """One byte to the driver per handled message: the driver's in-flight window moves on."""
    with contextlib.suppress(BlockingIOError):  # the driver is behind reading; it counts what it gets
        os.write(fd, b"\x01")


# --------------------------------------------------------------------- driving side


class ClientSide(ABC):
    """The driving half: one operation is one call, one publish, or one request through a chain."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self.url = options.url
        self.queue = options.queue
        self.payload = os.urandom(options.size // 2 + 1).hex()[: options.size].encode()
        self.queue_type = options.queue_type
        self.sequence = 0

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def operate(self, sent_ns: int, warmup: bool) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    async def server_product(self) -> tuple[str, str]:
        return "", ""

    def watched_queues(self) -> tuple[str, ...]:
        """The broker queues where this scenario's backlog waits (sampled during a burst)."""
        return ()

    def headers(self, sent_ns: int, warmup: bool) -> dict[str, Any]:
        """Send time, warm-up flag and sequence number, for the consumer's latency and ledger."""
        if warmup:
            return {SEND_TIME: sent_ns, WARMUP: True}
        self.sequence += 1
        return {SEND_TIME: sent_ns, SEQUENCE: self.sequence}
