"""What amqpkit.telemetry costs: RPC and one-way throughput without it, with the SDK and a no-op exporter,
and with a batch exporter, in the same run; and, with --floor, how much of a message's cost is the
OpenTelemetry SDK's own and how much is amqpkit's.

    .venv/bin/python scripts/otel_cost.py [--seconds 5] [--repeats 3] [--concurrency 64] [--rate R]
                                          [--modes ...] [--before DIR] [--out FILE]
    .venv/bin/python scripts/otel_cost.py --floor [--repeats 5] [--before DIR] [--out FILE]
    .venv/bin/python scripts/otel_cost.py --checks [--count 1000]

Each trial runs a server process and a client process, both in the same mode:

- ``off``: ``instrument()`` never called (the core's hooks stay ``None``);
- ``uninst``: ``instrument()`` with the SDK, then ``uninstrument()`` (the hooks back to ``None``);
- ``noop``: ``instrument()`` with the SDK's TracerProvider and MeterProvider, spans handed to an exporter that
  drops them (SimpleSpanProcessor), metrics aggregated in memory;
- ``batch``: the same with a BatchSpanProcessor whose exporter drops the spans;
- ``sampled``: ``batch`` with a ParentBased(TraceIdRatioBased(0.01)) sampler: 1 % of traces recorded, context
  still propagated and metrics still counted for every message; ``sampled10``: the same at 10 %;
- ``json``: ``batch`` whose exporter encodes every span to JSON first (``ReadableSpan.to_json``: roughly the work
  an exporter does before the network);
- ``header``: never instrumented, but every one-way message and every RPC request carries a ``traceparent``
  header of the W3C length, as instrumentation's do: what the header alone costs on the wire (encoded, carried
  by the broker, decoded), apart from the spans and the metrics.

``MODE@before`` runs a mode with ``--before DIR`` first on the import path: DIR holds a copy of the ``amqpkit``
package (say, the working tree's with the previous ``amqpkit/telemetry``), to compare two versions of the
instrumentation in one run.

Scenarios: ``rpc`` (RpcClient.call over direct reply-to at --concurrency callers; RpcServer echoes) and
``oneway`` (--concurrency publishers, confirmed; a Subscriber acks each). Modes are interleaved within each
repeat (the order rotates), so a machine whose load drifts hurts every mode alike. The figure is completed
operations per second over the measured window after a one-second warm-up; the report gives each mode's median
and range, and its ratio to ``off`` (median of the per-repeat ratios, with their range). ``--rate R`` paces the
callers to R operations per second in all: every mode then does the same work per second, and the CPU per
operation compares modes without the throughput's own effect on it (fewer operations per event-loop turn cost
more CPU each). With RabbitMQ on the same machine, the client also reads the node's CPU time (``beam.smp`` in
/proc) over the measured window: the broker's CPU per operation, reported beside the two processes'.

``--floor`` needs no broker. In one process per mode and repeat it times, round by round, per
message, the SDK's own work for what amqpkit records: a PRODUCER span and a CONSUMER span with the same
attributes (started and ended; with the batch exporter, flushed and encoded too), W3C inject and extract
through the SDK's propagator, attaching the consumer span's context, and the one histogram measurement per
delivery; then amqpkit's publish and consume hooks around a publish and a callback that do nothing (and, with
``--before DIR``, DIR's hooks beside them in the same process). The hooks minus the SDK's work is amqpkit's
share. It runs the modes above but ``off`` and ``uninst``.

``--checks``, never instrumented, counts the core's reads of :mod:`amqpkit._hooks` per RPC call and per
published-and-consumed message against the broker, and times one ``if _hooks.x is not None``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from amqpkit import Broker, BytesCodec, Delivery, Envelope, Exchange, Queue, RpcClient, RpcServer, Subscriber

MODES = ("off", "uninst", "header", "noop", "batch", "sampled10", "sampled", "json")
WIRE_HEADER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # what ``header`` sends: a traceparent's length
RATIOS = {"sampled": 0.01, "sampled10": 0.1}
SCENARIOS = ("rpc", "oneway")
URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def providers(mode: str, max_queue_size: int = 2048) -> tuple[Any, Any]:
    """The tracer and meter providers of ``mode`` (not ``off``)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    class EncodeAndDrop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            for span in spans:
                span.to_json(indent=None)
            return SpanExportResult.SUCCESS

    ratio = RATIOS.get(mode)
    tracer_provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)) if ratio is not None else None)
    if mode == "noop":
        tracer_provider.add_span_processor(SimpleSpanProcessor(Drop()))
    else:
        exporter = EncodeAndDrop() if mode == "json" else Drop()
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=max_queue_size))
    return tracer_provider, MeterProvider([InMemoryMetricReader()])


def setup(mode: str) -> None:
    mode = mode.split("@")[0]
    if mode in ("off", "header"):
        return
    from amqpkit import telemetry

    tracer_provider, meter_provider = providers(mode)
    telemetry.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    if mode == "uninst":
        telemetry.uninstrument()


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


async def client(mode: str, scenario: str, queue: str, seconds: float, concurrency: int, rate: float = 0) -> None:
    setup(mode)
    payload = b"x" * 256
    done = 0
    counting = False
    header = mode.split("@")[0] == "header"
    async with Broker(URL) as broker, RpcClient(broker, queue, codec=BytesCodec(), timeout=30) as rpc:

        async def one() -> None:
            headers = {"traceparent": WIRE_HEADER} if header else None  # a new dict per message, as the hooks make
            if scenario == "rpc":
                await rpc.call("echo", payload, returns=bytes, headers=headers)
            else:
                await broker.publish(
                    Envelope(payload, content_type="application/octet-stream", persistent=False,
                             headers=headers or {}),
                    routing_key=queue,
                )  # fmt: skip

        async def loop(stop_at: float, offset: float) -> None:
            nonlocal done
            interval = concurrency / rate if rate else 0.0  # each caller's share of --rate
            next_at = time.monotonic() + offset * interval
            while time.monotonic() < stop_at:
                await one()
                if counting:
                    done += 1
                if interval:
                    next_at += interval
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)

        start = time.monotonic()
        workers = [asyncio.ensure_future(loop(start + 1.0 + seconds, i / concurrency)) for i in range(concurrency)]
        await asyncio.sleep(1.0)  # warm-up
        broker_from = broker_cpu()  # read outside the client's own CPU window: the /proc scan is not a call's work
        counting = True
        measured_from = time.monotonic()
        cpu_from = time.process_time()
        await asyncio.gather(*workers)
        took = time.monotonic() - measured_from
        cpu = time.process_time() - cpu_from
        broker_to = broker_cpu()
    broker_us = None if broker_from is None or broker_to is None else (broker_to - broker_from) / max(done, 1) * 1e6
    print(json.dumps({"ops_per_s": done / took, "cpu_per_op_us": cpu / max(done, 1) * 1e6,
                      "broker_cpu_per_op_us": broker_us}), flush=True)  # fmt: skip


def broker_cpu() -> float | None:
    """CPU seconds used so far by the RabbitMQ node(s) on this machine (beam.smp), or None when none is seen."""
    total, seen = 0.0, False
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if name == "beam.smp":
            seen = True
            total += (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total if seen else None


def environment(mode: str, before: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if mode.endswith("@before"):
        if before is None:
            raise SystemExit(f"mode {mode} needs --before DIR")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (before, env.get("PYTHONPATH")) if p)
    return env


def trial(
    mode: str, scenario: str, seconds: float, concurrency: int, before: str | None, rate: float = 0
) -> tuple[float, float, float]:
    """Operations per second; CPU microseconds per operation, client and server together; and the broker's, when
    it runs on this machine (NaN otherwise)."""
    queue = f"otel-cost.{uuid.uuid4().hex[:8]}"
    me = [sys.executable, __file__]
    env = environment(mode, before)
    server = subprocess.Popen([*me, "--serve", mode, scenario, queue], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        out = subprocess.run([*me, "--client", mode, scenario, queue, str(seconds), str(concurrency), str(rate)],
                             capture_output=True, text=True, timeout=seconds + 120, check=True, env=env)  # fmt: skip
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
    broker = got.get("broker_cpu_per_op_us")
    return (float(got["ops_per_s"]), float(got["cpu_per_op_us"]) + float(served["cpu_per_op_us"]),
            math.nan if broker is None else float(broker))  # fmt: skip


FLOOR_MODES = ("noop", "batch", "sampled10", "sampled", "json")
FLOOR_PARTS = ("base", "spans", "sdk", "sdk_metric", "hooks", "hooks_before")


def floor_child(mode: str, count: int, rounds: int, before: str | None = None) -> dict[str, list[float]]:
    """CPU microseconds per message (all threads, the exporter's included) of each part, ``rounds`` times each.

    ``base``: a publish and a callback that do nothing (a stub broker: no network); ``spans``: the SDK's
    PRODUCER and CONSUMER spans with amqpkit's attributes; ``sdk``: that, plus W3C inject/extract through the
    SDK's propagator and attaching the consumer span's context; ``sdk_metric``: that, plus the one histogram
    measurement per delivery; ``hooks``: ``base`` through amqpkit's publish and consume hooks; ``hooks_before``:
    the same through the hooks of ``before``'s ``amqpkit/telemetry``, loaded beside this one (same core, same
    providers), so that the two are measured in the same process, round by round.
    """
    from types import SimpleNamespace

    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from pamqp.commands import Basic

    from amqpkit import telemetry
    from amqpkit.message import Delivery, new_message_id

    # room for every span of a round (none dropped), and never below the batch processor's batch size
    tracer_provider, meter_provider = providers(mode, max_queue_size=max(2048, count * 4))
    previous: Any = None
    if before is not None:
        import importlib.util

        init = os.path.join(before, "amqpkit", "telemetry", "__init__.py")
        spec = importlib.util.spec_from_file_location(
            "amqpkit._telemetry_before", init, submodule_search_locations=[os.path.dirname(init)]
        )
        assert spec is not None and spec.loader is not None
        previous = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = previous
        spec.loader.exec_module(previous)
        previous.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    telemetry.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    tracer = trace.get_tracer("amqpkit.floor", tracer_provider=tracer_provider)
    histogram = meter_provider.get_meter("amqpkit.floor").create_histogram("floor.duration", "s")
    propagator = TraceContextTextMapPropagator()
    body = b"x" * 256
    queue = "floor.q"
    sent: list[Envelope] = []

    class StubBroker:
        async def publish(self, envelope: Envelope, **kwargs: Any) -> None:
            sent.append(envelope)

        async def _publish(self, body: bytes, properties: Basic.Properties, *args: Any) -> None:
            # what the hooks call since they write the trace context into the properties the core sends
            # (an amqpkit from before that, given with --before, calls publish above)
            sent.append(Envelope(body, message_id=properties.message_id, headers=properties.headers or {}))

    async def callback(delivery: Delivery[bytes]) -> None:
        return None

    broker = StubBroker()
    consumer = SimpleNamespace(callback=callback, queue_name=queue)

    def drive(coroutine: Any) -> None:
        try:
            coroutine.send(None)
        except StopIteration:
            pass
        else:  # pragma: no cover - the stubs never wait
            raise RuntimeError("a stub waited")

    def delivery(headers: dict[str, Any], message_id: str | None) -> Delivery[bytes]:
        props = Basic.Properties(message_id=message_id, headers=headers, content_type="application/octet-stream")
        return Delivery(body, body, props, exchange="", routing_key=queue)

    def send_attributes(message_id: str) -> dict[str, Any]:
        return {"messaging.system": "rabbitmq", "messaging.operation.name": "send",
                "messaging.operation.type": "send", "messaging.destination.name": "",
                "messaging.rabbitmq.destination.routing_key": queue, "messaging.message.body.size": len(body),
                "messaging.message.id": message_id}  # fmt: skip

    def process_attributes(message_id: str) -> dict[str, Any]:
        return {"messaging.system": "rabbitmq", "messaging.operation.name": "process",
                "messaging.operation.type": "process", "messaging.destination.name": "",
                "messaging.destination.subscription.name": queue, "messaging.rabbitmq.destination.routing_key": queue,
                "messaging.message.body.size": len(body), "messaging.rabbitmq.message.delivery_tag": 0,
                "messaging.message.id": message_id}  # fmt: skip

    duration_attributes = {"messaging.destination.subscription.name": queue, "messaging.system": "rabbitmq"}

    def base() -> None:
        drive(broker.publish(Envelope(body, content_type="application/octet-stream"), routing_key=queue))
        envelope = sent.pop()
        drive(callback(delivery(envelope.headers, envelope.message_id)))

    def sdk(propagate: bool, metric: bool) -> None:
        message_id = new_message_id()
        span = tracer.start_span(f"send {queue}", kind=SpanKind.PRODUCER, attributes=send_attributes(message_id))
        carrier: dict[str, Any] = {}
        if propagate:
            propagator.inject(carrier, context=trace.set_span_in_context(span))
        span.end()
        parent = propagator.extract(carrier) if propagate else None
        span = tracer.start_span(f"process {queue}", parent, SpanKind.CONSUMER, process_attributes(message_id))
        if propagate:
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            if metric:
                histogram.record(0.0001, duration_attributes)
            otel_context.detach(token)
        span.end()

    def hooks(module: Any = telemetry) -> None:
        drive(module._publish(broker, Envelope(body, content_type="application/octet-stream"), "", queue, False, True,
                              None))  # fmt: skip
        envelope = sent.pop()
        drive(module._consume(consumer, delivery(envelope.headers, envelope.message_id)))

    parts: dict[str, Callable[[], None]] = {
        "base": base,
        "spans": lambda: sdk(False, False),
        "sdk": lambda: sdk(True, False),
        "sdk_metric": lambda: sdk(True, True),
        "hooks": hooks,
        "hooks_before": lambda: hooks(previous),
    }
    measured = FLOOR_PARTS if previous is not None else FLOOR_PARTS[:-1]
    figures: dict[str, list[float]] = {part: [] for part in measured}
    for round_ in range(rounds):
        for part in measured[round_ % len(measured) :] + measured[: round_ % len(measured)]:
            fn = parts[part]
            tracer_provider.force_flush()
            started = time.process_time()
            for _ in range(count):
                fn()
            tracer_provider.force_flush()  # the batch exporter's encoding counts
            figures[part].append((time.process_time() - started) / count * 1e6)
    telemetry.uninstrument()
    if previous is not None:
        previous.uninstrument()
    tracer_provider.shutdown()
    meter_provider.shutdown()
    return figures


def floor_summary(got: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per round: the SDK's parts, the hooks' total over ``base``, and amqpkit's share (hooks minus the SDK's)."""

    def minus(a: list[float], b: list[float]) -> list[float]:
        return [x - y for x, y in zip(a, b, strict=True)]

    hooks = minus(got["hooks"], got["base"])
    summary = {
        "sdk_spans": got["spans"],
        "sdk_propagation_and_context": minus(got["sdk"], got["spans"]),
        "sdk_histogram": minus(got["sdk_metric"], got["sdk"]),
        "sdk_floor": got["sdk_metric"],
        "hooks": hooks,
        "amqpkit_share": minus(hooks, got["sdk_metric"]),
    }
    if "hooks_before" in got:
        before = minus(got["hooks_before"], got["base"])
        summary["hooks_before"] = before
        summary["amqpkit_share_before"] = minus(before, got["sdk_metric"])
        summary["hooks_now_over_before"] = [x / y for x, y in zip(hooks, before, strict=True)]
    return summary


def floor_report(args: argparse.Namespace) -> None:
    parts = FLOOR_PARTS if args.before else FLOOR_PARTS[:-1]
    runs: dict[str, dict[str, list[float]]] = {mode: {part: [] for part in parts} for mode in FLOOR_MODES}
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for repeat in range(args.repeats):
        for mode in FLOOR_MODES:
            command = [sys.executable, __file__, "--floor-child", mode, str(args.count), str(args.rounds)]
            if args.before:
                command += ["--before", args.before]
            out = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            for part in parts:
                runs[mode][part].extend(got[part])
            shown = " ".join(f"{part} {statistics.median(got[part]):.1f}" for part in parts)
            print(f"repeat {repeat + 1} {mode:<10} us/message: {shown}", flush=True)
    print(f"\nCPU us per message (a publish and its delivery), medians of {args.repeats} repeats x {args.rounds} "
          f"rounds (range); load average at end {os.getloadavg()}")  # fmt: skip
    report: dict[str, Any] = {"count": args.count, "rounds": args.rounds, "repeats": args.repeats,
                              "loadavg_at_end": os.getloadavg(), "cpus": os.cpu_count(), "runs": runs,
                              "summary": {}}  # fmt: skip
    for mode, got in runs.items():
        summary = floor_summary(got)
        report["summary"][mode] = {k: {"median": statistics.median(v), "range": [min(v), max(v)]}
                                   for k, v in summary.items()}  # fmt: skip
        print(f"{mode:<10} " + "; ".join(f"{k} {statistics.median(v):.2f} ({min(v):.2f} to {max(v):.2f})"
                                         for k, v in summary.items()))  # fmt: skip
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)


async def count_checks(count: int) -> dict[str, Any]:
    """How many times the core reads a hook per operation, never instrumented, against the real broker."""
    import collections

    from amqpkit import _hooks

    reads: collections.Counter[str] = collections.Counter()

    class Counting:
        def __getattr__(self, name: str) -> Any:
            reads[name] += 1
            return getattr(_hooks, name)

    patched: list[Any] = [
        m for name, m in sys.modules.items() if name.startswith("amqpkit") and getattr(m, "_hooks", None) is _hooks
    ]
    for module in patched:
        module._hooks = Counting()
    queue = f"otel-cost.{uuid.uuid4().hex[:8]}"
    per_op: dict[str, Any] = {}
    try:
        async with Broker(URL) as broker:
            server = RpcServer(broker, Queue(queue, durable=False, auto_delete=True))

            @server.method("echo")
            async def echo(payload: bytes) -> bytes:
                return payload

            async with server, RpcClient(broker, queue, codec=BytesCodec(), timeout=30) as rpc:
                await rpc.call("echo", b"x", returns=bytes)  # a first call sets up the reply consumer
                reads.clear()
                for _ in range(count):
                    await rpc.call("echo", b"x", returns=bytes)
                per_op["rpc"] = {name: n / count for name, n in sorted(reads.items())}
            got = 0
            done = asyncio.Event()

            async def on_message(delivery: Delivery[bytes]) -> None:
                nonlocal got
                await delivery.ack()
                got += 1
                if got == count:
                    done.set()

            spec = Queue(queue + ".oneway", durable=False, auto_delete=True)
            async with Subscriber(broker, Exchange(""), on_message, queue=spec):
                reads.clear()
                for _ in range(count):
                    await broker.publish(Envelope(b"x", persistent=False), routing_key=spec.name)
                await asyncio.wait_for(done.wait(), 60)
                per_op["oneway"] = {name: n / count for name, n in sorted(reads.items())}
    finally:
        for module in patched:
            module._hooks = _hooks
    return per_op


def time_check(count: int = 2_000_000) -> float:
    """Nanoseconds one ``if _hooks.x is not None`` costs over an empty loop, as the core writes it."""
    from amqpkit import _hooks

    def checked(n: int) -> None:
        for _ in range(n):
            if _hooks.publish is not None:
                pass

    def empty(n: int) -> None:
        for _ in range(n):
            pass

    best = []
    for _ in range(5):
        started = time.process_time()
        checked(count)
        middle = time.process_time()
        empty(count)
        best.append(((middle - started) - (time.process_time() - middle)) / count * 1e9)
    return statistics.median(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    parser.add_argument("--modes", nargs="*", default=list(MODES), help=f"of {', '.join(MODES)}; MODE@before too")
    parser.add_argument("--before", help="a directory holding another amqpkit package, for the MODE@before modes")
    parser.add_argument("--floor", action="store_true", help="the SDK's floor against amqpkit's share, no broker")
    parser.add_argument("--count", type=int, default=1000, help="messages per --floor measurement")
    parser.add_argument("--rounds", type=int, default=5, help="--floor measurements of each part per repeat")
    parser.add_argument("--checks", action="store_true", help="hook reads per operation, never instrumented")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0, help="operations per second in all (0: as fast as it goes)")
    parser.add_argument("--client", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--floor-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.before:
        args.before = os.path.abspath(args.before)
    if args.serve:
        asyncio.run(serve(*args.serve))
        return
    if args.client:
        mode, scenario, queue, seconds, concurrency, rate = args.client
        asyncio.run(client(mode, scenario, queue, float(seconds), int(concurrency), float(rate)))
        return
    if args.floor_child:
        mode, count, rounds = args.floor_child
        print(json.dumps(floor_child(mode, int(count), int(rounds), args.before)), flush=True)
        return
    if args.floor:
        floor_report(args)
        return
    if args.checks:
        per_op = asyncio.run(count_checks(args.count))
        ns = time_check()
        print(f"one 'if _hooks.x is not None': {ns:.1f} ns over an empty loop (median of 5); "
              f"load average {os.getloadavg()}")  # fmt: skip
        for scenario, reads in per_op.items():
            total = sum(reads.values())
            print(f"{scenario}: {total:g} hook reads per operation ({reads}): {total * ns / 1000:.3f} us")
        return

    modes = tuple(args.modes)
    if "off" not in modes:
        parser.error("--modes must include off: every figure is a ratio to it (with MODE@before, list off too)")
    results: dict[str, dict[str, list[float]]] = {s: {m: [] for m in modes} for s in args.scenarios}
    cpu: dict[str, dict[str, list[float]]] = {s: {m: [] for m in modes} for s in args.scenarios}
    broker: dict[str, dict[str, list[float]]] = {s: {m: [] for m in modes} for s in args.scenarios}
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for repeat in range(args.repeats):
        for scenario in args.scenarios:
            order = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]
            for mode in order:
                for attempt in (1, 2):  # a trial cut short (say, someone restarted the broker) runs once more
                    try:
                        rate, us, broker_us = trial(mode, scenario, args.seconds, args.concurrency, args.before,
                                                    args.rate)  # fmt: skip
                        break
                    except (subprocess.SubprocessError, AssertionError, ValueError) as exc:
                        if attempt == 2:
                            raise
                        print(f"repeat {repeat + 1} {scenario} {mode} failed ({exc!r}); again in 10 s", flush=True)
                        time.sleep(10)
                results[scenario][mode].append(rate)
                cpu[scenario][mode].append(us)
                broker[scenario][mode].append(broker_us)
                print(f"repeat {repeat + 1} {scenario:<6} {mode:<14} {rate:9.0f} ops/s {us:7.0f} CPU us/op "
                      f"(broker {broker_us:.0f})", flush=True)  # fmt: skip
    report: dict[str, Any] = {"concurrency": args.concurrency, "rate": args.rate, "seconds": args.seconds,
                              "repeats": args.repeats,
                              "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "scenarios": {}}  # fmt: skip
    print(f"\nc={args.concurrency}, rate {args.rate or 'unlimited'}, {args.seconds:g} s per trial, "
          f"{args.repeats} interleaved repeats; "
          f"load average at end {os.getloadavg()}")  # fmt: skip
    for scenario, by_mode in results.items():
        entry: dict[str, Any] = {}
        for mode, rates in by_mode.items():
            ratios = [r / o for r, o in zip(rates, by_mode["off"], strict=True)]
            used = cpu[scenario][mode]
            extra = [u - o for u, o in zip(used, cpu[scenario]["off"], strict=True)]
            cpu_ratios = [u / o for u, o in zip(used, cpu[scenario]["off"], strict=True)]
            broker_used = broker[scenario][mode]
            entry[mode] = {
                "broker_cpu_us_per_op": broker_used,
                "broker_cpu_us_per_op_median": statistics.median(broker_used),
                "cpu_us_per_op": used,
                "cpu_us_per_op_median": statistics.median(used),
                "extra_cpu_us_per_op_median": statistics.median(extra),
                "extra_cpu_us_per_op_range": [min(extra), max(extra)],
                "cpu_ratio_to_off_median": statistics.median(cpu_ratios),
                "cpu_ratio_range": [min(cpu_ratios), max(cpu_ratios)],
                "ops_per_s": rates,
                "median": statistics.median(rates),
                "ratio_to_off_median": statistics.median(ratios),
                "ratio_range": [min(ratios), max(ratios)],
            }
            print(f"{scenario:<6} {mode:<14} median {statistics.median(rates):8.0f} ops/s "
                  f"(range {min(rates):.0f}-{max(rates):.0f}); vs off x{statistics.median(ratios):.3f} "
                  f"(range {min(ratios):.3f}-{max(ratios):.3f}); CPU {statistics.median(used):.0f} us/op, "
                  f"+{statistics.median(extra):.0f} (range {min(extra):.0f} to {max(extra):.0f}), "
                  f"x{statistics.median(cpu_ratios):.3f} "
                  f"(range {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f}); "
                  f"broker CPU {statistics.median(broker_used):.0f} us/op")  # fmt: skip
        report["scenarios"][scenario] = entry
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
