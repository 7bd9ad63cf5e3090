"""What amqpkit.telemetry costs: RPC and one-way throughput without it, with the SDK and a no-op exporter,
and with a batch exporter, in the same run.

    .venv/bin/python scripts/otel_cost.py [--seconds 5] [--repeats 3] [--concurrency 64] [--out FILE]

Each trial runs a server process and a client process, both in the same mode:

- ``off``: ``instrument()`` never called (the core's hooks stay ``None``);
- ``noop``: ``instrument()`` with the SDK's TracerProvider and MeterProvider, spans handed to an exporter that
  drops them (SimpleSpanProcessor), metrics aggregated in memory;
- ``batch``: the same with a BatchSpanProcessor whose exporter encodes every span to JSON (the work an OTLP/JSON
  exporter does before the network) and drops it;
- ``sampled``: ``batch`` with a ParentBased(TraceIdRatioBased(0.01)) sampler: 1 % of traces recorded, context
  still propagated and metrics still counted for every message.

Scenarios: ``rpc`` (RpcClient.call over direct reply-to at --concurrency callers; RpcServer echoes) and
``oneway`` (--concurrency publishers, confirmed; a Subscriber acks each). Modes are interleaved within each
repeat (the order rotates), so a machine whose load drifts hurts every mode alike. The figure is completed
operations per second over the measured window after a one-second warm-up; the report gives each mode's median
and range, and its ratio to ``off`` (median of the per-repeat ratios, with their range).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from amqpkit import Broker, BytesCodec, Delivery, Envelope, Exchange, Queue, RpcClient, RpcServer, Subscriber

MODES = ("off", "noop", "batch", "sampled")
SCENARIOS = ("rpc", "oneway")
URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def setup(mode: str) -> None:
    if mode == "off":
        return
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from amqpkit import telemetry

    class Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    class EncodeAndDrop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            for span in spans:
                span.to_json(indent=None)
            return SpanExportResult.SUCCESS

    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    tracer_provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.01)) if mode == "sampled" else None)
    if mode == "noop":
        tracer_provider.add_span_processor(SimpleSpanProcessor(Drop()))
    else:
        tracer_provider.add_span_processor(BatchSpanProcessor(EncodeAndDrop()))
    telemetry.instrument(tracer_provider=tracer_provider, meter_provider=MeterProvider([InMemoryMetricReader()]))


async def serve(mode: str, scenario: str, queue: str) -> None:
    setup(mode)
    handled = 0
    cpu_first = cpu_last = 0.0

    def count() -> None:
        nonlocal handled, cpu_first, cpu_last
        handled += 1
        cpu_last = time.process_time()
        if handled == 1:
            cpu_first = cpu_last

    async with Broker(URL) as broker:
        if scenario == "rpc":
            server = RpcServer(broker, Queue(queue, durable=False, auto_delete=True), concurrency=128)

            @server.method("echo")
            async def echo(payload: bytes) -> bytes:
                count()
                return payload

            running: Any = server
        else:

            async def on_message(delivery: Delivery[bytes]) -> None:
                count()
                await delivery.ack()

            spec = Queue(queue, durable=False, auto_delete=True)
            running = Subscriber(broker, Exchange(""), on_message, queue=spec, prefetch=128)
        async with running:
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes it
    print(json.dumps({"cpu_per_op_us": (cpu_last - cpu_first) / max(handled - 1, 1) * 1e6}), flush=True)


async def client(mode: str, scenario: str, queue: str, seconds: float, concurrency: int) -> None:
    setup(mode)
    payload = b"x" * 256
    done = 0
    counting = False
    async with Broker(URL) as broker, RpcClient(broker, queue, codec=BytesCodec(), timeout=30) as rpc:

        async def one() -> None:
            if scenario == "rpc":
                await rpc.call("echo", payload, returns=bytes)
            else:
                await broker.publish(
                    Envelope(payload, content_type="application/octet-stream", persistent=False), routing_key=queue
                )

        async def loop(stop_at: float) -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                await one()
                if counting:
                    done += 1

        start = time.monotonic()
        workers = [asyncio.ensure_future(loop(start + 1.0 + seconds)) for _ in range(concurrency)]
        await asyncio.sleep(1.0)  # warm-up
        counting = True
        measured_from = time.monotonic()
        cpu_from = time.process_time()
        await asyncio.gather(*workers)
        took = time.monotonic() - measured_from
        cpu = time.process_time() - cpu_from
    print(json.dumps({"ops_per_s": done / took, "cpu_per_op_us": cpu / max(done, 1) * 1e6}), flush=True)


def trial(mode: str, scenario: str, seconds: float, concurrency: int) -> tuple[float, float]:
    """Operations per second, and CPU microseconds per operation (client and server together)."""
    queue = f"otel-cost.{uuid.uuid4().hex[:8]}"
    me = [sys.executable, __file__]
    server = subprocess.Popen([*me, "--serve", mode, scenario, queue], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        out = subprocess.run([*me, "--client", mode, scenario, queue, str(seconds), str(concurrency)],
                             capture_output=True, text=True, timeout=seconds + 120, check=True)  # fmt: skip
        got = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.stdout is not None
    served = json.loads(server.stdout.read().strip().splitlines()[-1])
    return float(got["ops_per_s"]), float(got["cpu_per_op_us"]) + float(served["cpu_per_op_us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(*args.serve))
        return
    if args.client:
        mode, scenario, queue, seconds, concurrency = args.client
        asyncio.run(client(mode, scenario, queue, float(seconds), int(concurrency)))
        return

    results: dict[str, dict[str, list[float]]] = {s: {m: [] for m in MODES} for s in args.scenarios}
    cpu: dict[str, dict[str, list[float]]] = {s: {m: [] for m in MODES} for s in args.scenarios}
    for repeat in range(args.repeats):
        for scenario in args.scenarios:
            order = MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]
            for mode in order:
                rate, us = trial(mode, scenario, args.seconds, args.concurrency)
                results[scenario][mode].append(rate)
                cpu[scenario][mode].append(us)
                print(f"repeat {repeat + 1} {scenario:<6} {mode:<5} {rate:9.0f} ops/s {us:7.0f} CPU us/op", flush=True)
    report: dict[str, Any] = {"concurrency": args.concurrency, "seconds": args.seconds, "repeats": args.repeats,
                              "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "scenarios": {}}  # fmt: skip
    print(f"\nc={args.concurrency}, {args.seconds:g} s per trial, {args.repeats} interleaved repeats")
    for scenario, by_mode in results.items():
        entry: dict[str, Any] = {}
        for mode, rates in by_mode.items():
            ratios = [r / o for r, o in zip(rates, by_mode["off"], strict=True)]
            used = cpu[scenario][mode]
            extra = [u - o for u, o in zip(used, cpu[scenario]["off"], strict=True)]
            entry[mode] = {
                "cpu_us_per_op": used,
                "cpu_us_per_op_median": statistics.median(used),
                "extra_cpu_us_per_op_median": statistics.median(extra),
                "extra_cpu_us_per_op_range": [min(extra), max(extra)],
                "ops_per_s": rates,
                "median": statistics.median(rates),
                "ratio_to_off_median": statistics.median(ratios),
                "ratio_range": [min(ratios), max(ratios)],
            }
            print(f"{scenario:<6} {mode:<5} median {statistics.median(rates):8.0f} ops/s "
                  f"(range {min(rates):.0f}-{max(rates):.0f}); vs off x{statistics.median(ratios):.3f} "
                  f"(range {min(ratios):.3f}-{max(ratios):.3f}); CPU {statistics.median(used):.0f} us/op, "
                  f"+{statistics.median(extra):.0f} (range {min(extra):.0f} to {max(extra):.0f})")  # fmt: skip
        report["scenarios"][scenario] = entry
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
