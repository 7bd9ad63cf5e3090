"""Instrumentation over minutes: every message's spans exported, each child under its parent, memory flat.

One process publishes one-way messages (32 publishers, at most :data:`BACKLOG` of them not yet consumed; a
consumer acks each) and makes RPC calls (32 callers, an echoing server) for ``--seconds``, instrumented with a
``BatchSpanProcessor`` whose exporter only counts. At the end every publish must have had a PRODUCER span,
every delivery a CONSUMER span under it, every call a CLIENT span with a SERVER span under it, nothing left
unpaired, and the process's resident memory, read every 15 s, must not grow by more than ``--rss-growth`` MB
after the first reading. ``--sdk`` adds a span processor of its own, so that every span is the SDK's rather
than amqpkit's lean span (for comparison).

    .venv/bin/python scripts/otel_minutes.py --seconds 120 [--sdk]

The broker URL comes from AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/). Exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from amqpkit import Broker, Delivery, Envelope, Queue, RpcClient, RpcServer, telemetry

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
_PARENTS = (SpanKind.PRODUCER, SpanKind.CLIENT)


class Pairing(SpanExporter):
    """Counts spans by kind and type, and pairs each CONSUMER or SERVER span with its parent as they come."""

    def __init__(self) -> None:
        self.kinds: Counter[SpanKind] = Counter()
        self.types: Counter[str] = Counter()
        self.parents_waiting: set[int] = set()  # exported parents whose child has not come yet
        self.children_waiting: set[int] = set()  # parent ids of exported children whose parent has not come yet
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.lock:
            for span in spans:
                self.kinds[span.kind] += 1
                self.types[type(span).__name__] += 1
                if span.kind in _PARENTS and span.context is not None:
                    own = span.context.span_id
                    if own in self.children_waiting:
                        self.children_waiting.remove(own)
                    else:
                        self.parents_waiting.add(own)
                elif span.parent is not None:
                    parent = span.parent.span_id
                    if parent in self.parents_waiting:
                        self.parents_waiting.remove(parent)
                    else:
                        self.children_waiting.add(parent)
        return SpanExportResult.SUCCESS


BACKLOG = 2048
"""Messages published and not yet consumed, at most: the run is a closed loop, so its memory can level off."""


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


async def run(seconds: float, sdk: bool) -> dict[str, object]:
    exporter = Pairing()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=100_000))
    if sdk:
        tracer_provider.add_span_processor(SpanProcessor())  # not one of the SDK's own: the SDK's spans
    meter_provider = MeterProvider([InMemoryMetricReader()])
    telemetry.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    name = f"otel-minutes.{uuid.uuid4().hex[:8]}"
    sent = consumed = calls = 0
    rss: list[float] = []
    try:
        async with Broker(URL) as broker:
            server = RpcServer(broker, Queue(f"{name}.rpc", auto_delete=True))

            @server.method("echo")
            async def echo(payload: str) -> str:
                return payload

            drained = asyncio.Event()  # set once the publishers have stopped and every message has come
            # At most BACKLOG messages published and not yet consumed: unbounded, the publishers outran the
            # consumer in this one process, the queue grew for as long as the run lasted, and so did this
            # script's own record of spans waiting for their pair, which the memory check then counted.
            room = asyncio.Semaphore(BACKLOG)

            async def on_message(delivery: Delivery[bytes]) -> None:
                nonlocal consumed
                consumed += 1
                room.release()
                await delivery.ack()
                if time.monotonic() >= stop and consumed >= sent:
                    drained.set()

            stop = time.monotonic() + seconds
            queue = Queue(f"{name}.q", auto_delete=True)
            consumer = await broker.consume(queue, on_message)
            try:
                async with server, RpcClient(broker, f"{name}.rpc", timeout=30) as client:

                    async def publisher() -> None:
                        nonlocal sent
                        while time.monotonic() < stop:
                            await room.acquire()
                            await broker.publish(Envelope(b"x" * 128), routing_key=queue.name)
                            sent += 1

                    async def caller() -> None:
                        nonlocal calls
                        while time.monotonic() < stop:
                            if await client.call("echo", "hi", returns=str) != "hi":
                                raise AssertionError("wrong reply")
                            calls += 1

                    async def watch() -> None:
                        while time.monotonic() < stop:
                            await asyncio.sleep(min(15.0, max(stop - time.monotonic(), 0.0)))
                            rss.append(round(rss_mb(), 1))

                    await asyncio.gather(*[publisher() for _ in range(32)], *[caller() for _ in range(32)], watch())
                    if consumed < sent:
                        await asyncio.wait_for(drained.wait(), 60)
            finally:
                await consumer.cancel()
    finally:
        tracer_provider.force_flush()
        telemetry.uninstrument()
        tracer_provider.shutdown()
        meter_provider.shutdown()
    return {
        "seconds": seconds, "spans": "sdk" if sdk else "lean", "published": sent, "consumed": consumed,
        "calls": calls, "spans_by_kind": {k.name: v for k, v in exporter.kinds.items()},
        "span_types": dict(exporter.types), "unpaired": len(exporter.parents_waiting) + len(exporter.children_waiting),
        "rss_mb_every_15_s": rss,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--sdk", action="store_true", help="every span through the SDK's Span class")
    parser.add_argument("--rss-growth", type=float, default=8.0, help="MB the process may grow after 15 s")
    args = parser.parse_args()
    got = asyncio.run(run(args.seconds, args.sdk))
    kinds: dict[str, int] = got["spans_by_kind"]  # type: ignore[assignment]
    rss: list[float] = got["rss_mb_every_15_s"]  # type: ignore[assignment]
    problems = []
    if not (kinds.get("PRODUCER") == kinds.get("CONSUMER") == got["published"] == got["consumed"]):
        problems.append("one-way: published, consumed and their spans differ")
    if not (kinds.get("CLIENT") == kinds.get("SERVER") == got["calls"]):
        problems.append("rpc: calls and their spans differ")
    if got["unpaired"]:
        problems.append(f"{got['unpaired']} spans without their parent or child")
    if len(rss) >= 2 and max(rss) - rss[0] > args.rss_growth:
        problems.append(f"resident memory grew {max(rss) - rss[0]:.1f} MB after the first reading")
    for key, value in got.items():
        print(f"{key}: {value}")
    print("OK" if not problems else "FAILED: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
