"""The two duration histograms reach the SDK in runs: none is lost, none counted twice, every collection sees all
of them, and exemplars still point at the message's span."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics._internal import instrument as sdk_instrument
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import TracerProvider

from amqpkit import Broker, Envelope, Queue, RpcClient, RpcServer, telemetry
from amqpkit.telemetry.instruments import RUN, Durations
from amqpkit.telemetry.lean import _release

from ..deliveries import acked_bodies
from ..waiting import wait_for
from .conftest import Telemetry

EXEMPLARS = "context" in inspect.signature(sdk_instrument.Histogram.record).parameters  # SDK 1.28 on


def _lean_releases() -> tuple[tuple[int, int], ...]:
    try:
        from amqpkit.telemetry.lean_histogram import SDK_CHECKED
    except ImportError:  # an SDK without the internals lean histograms use
        return ()
    return SDK_CHECKED


LEAN = _release() in _lean_releases()


@pytest.fixture
def record_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the SDK histograms ``record`` was called on while the test runs."""
    calls: list[str] = []
    original = sdk_instrument.Histogram.record

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(self.name)
        original(self, *args, **kwargs)

    counting.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]  # with or without context
    monkeypatch.setattr(sdk_instrument.Histogram, "record", counting)
    return calls


@pytest.fixture
def sdk_records(monkeypatch: pytest.MonkeyPatch, record_calls: list[str]) -> list[str]:
    """For each measurement handed to the SDK while the test runs (by ``record``, or merged in a run by a lean
    histogram), its histogram's name."""
    calls = record_calls
    try:
        from amqpkit.telemetry.lean_histogram import LeanHistogram
    except ImportError:  # an SDK without the internals lean histograms use
        return calls
    merge = LeanHistogram.merge

    def counting_merge(self: Any, run: Any, matches: Any) -> None:
        calls.extend([self.histogram.name] * len(run))
        merge(self, run, matches)

    monkeypatch.setattr(LeanHistogram, "merge", counting_merge)
    return calls


def _points(data: MetricsData | None, name: str) -> list[Any]:
    return [p for rm in (data.resource_metrics if data else ()) for sm in rm.scope_metrics for m in sm.metrics
            if m.name == name for p in m.data.data_points]  # fmt: skip


async def test_messages_record_their_durations_in_runs(
    broker: Broker, name: str, otel: Telemetry, sdk_records: list[str]
) -> None:
    queue = Queue(f"{name}.q", auto_delete=True)
    server = RpcServer(broker, Queue(f"{name}.rpc", auto_delete=True))

    @server.method("echo")
    async def echo(payload: str) -> str:
        return payload

    seen, handle = acked_bodies()

    consumer = await broker.consume(queue, handle)
    try:
        async with server, RpcClient(broker, f"{name}.rpc", timeout=30) as client:
            for n in range(3):
                assert await client.call("echo", f"x{n}", returns=str) == f"x{n}"
        for n in range(5):
            await broker.publish(Envelope(body=b"%d" % n), routing_key=queue.name)
        await wait_for(lambda: len(seen) == 5)
        await wait_for(lambda: len(otel.named("process " + queue.name)) == 5)
        # Fewer than a run each: nothing has gone to the SDK's histograms yet ...
        assert sdk_records == []
        # ... and a collection takes them all: 5 handler runs and 3 server runs, 3 calls.
        data = otel.reader.get_metrics_data()
        process = _points(data, "messaging.process.duration")
        assert sorted(p.count for p in process) == [3, 5]
        assert [p.count for p in _points(data, "amqpkit.rpc.client.duration")] == [3]
        assert sorted(sdk_records) == ["amqpkit.rpc.client.duration"] * 3 + ["messaging.process.duration"] * 8
        if EXEMPLARS:  # each duration was recorded in the context the handler ran in: exemplars name its span
            consumer_spans = {s.context.span_id for s in otel.spans() if s.kind is trace.SpanKind.CONSUMER}
            exemplar_spans = {e.span_id for p in process for e in p.exemplars if e.span_id is not None}
            assert exemplar_spans & consumer_spans
            # and an RPC call's duration was recorded in its CLIENT span (the calls above run under no span of the
            # test's: an exemplar can only name amqpkit's own)
            client_spans = {s.context.span_id for s in otel.spans() if s.kind is trace.SpanKind.CLIENT}
            call_points = _points(data, "amqpkit.rpc.client.duration")
            call_exemplars = {e.span_id for p in call_points for e in p.exemplars}
            assert call_exemplars and call_exemplars <= client_spans
    finally:
        await consumer.cancel()


def _provider(temporality: AggregationTemporality) -> tuple[MeterProvider, InMemoryMetricReader, Durations]:
    reader = InMemoryMetricReader(preferred_temporality={Histogram: temporality})
    provider = MeterProvider(metric_readers=[reader])
    return provider, reader, Durations(provider.get_meter("test").create_histogram("d", "s"))


@pytest.fixture(params=[AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA], ids=["cumulative", "delta"])
def durations(request: pytest.FixtureRequest) -> Iterator[tuple[InMemoryMetricReader, Durations, bool]]:
    provider, reader, durations = _provider(request.param)
    yield reader, durations, request.param is AggregationTemporality.DELTA
    provider.shutdown()


def test_a_full_run_goes_to_the_sdk_without_a_collection(
    durations: tuple[InMemoryMetricReader, Durations, bool], sdk_records: list[str]
) -> None:
    _, recorder, _ = durations
    context = otel_context.get_current()
    for _ in range(RUN - 1):
        recorder.record(0.001, {"k": "v"}, context)
    assert sdk_records == []
    recorder.record(0.001, {"k": "v"}, context)
    assert len(sdk_records) == RUN  # the buffer is bounded by the run, collected or not


def test_threads_recording_and_collecting_lose_and_double_nothing(
    durations: tuple[InMemoryMetricReader, Durations, bool],
) -> None:
    reader, recorder, delta = durations
    context = otel_context.get_current()
    per_thread, threads = 5_000, 4
    done = threading.Event()
    # Collections run beside the recording threads; each must see every value once: cumulative counts only grow,
    # and delta counts and sums add up to the whole.
    counts: list[int] = []
    sums: list[float] = []

    def collect() -> None:
        points = _points(reader.get_metrics_data(), "d")
        counts.append(sum(p.count for p in points))
        sums.append(sum(p.sum for p in points))

    def collect_until_done() -> None:
        while not done.is_set():
            recorder.flush()
            collect()

    def record(n: int) -> None:
        for i in range(per_thread):
            recorder.record((n * per_thread + i) % 7 / 1000, {"thread": str(n % 2)}, context)
            if i % 97 == 0:
                recorder.flush()  # a run handed on from two threads at once

    collector = threading.Thread(target=collect_until_done)
    collector.start()
    workers = [threading.Thread(target=record, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    collector.join()
    recorder.flush()
    collect()
    expected_sum = sum((n * per_thread + i) % 7 / 1000 for n in range(threads) for i in range(per_thread))
    if delta:
        assert sum(counts) == per_thread * threads
        assert sum(sums) == pytest.approx(expected_sum)
    else:
        assert counts[-1] == per_thread * threads
        assert sums[-1] == pytest.approx(expected_sum)
        assert counts == sorted(counts)


@pytest.mark.skipif(not LEAN, reason="lean histograms: on the SDK releases they were checked against")
def test_the_default_set_up_merges_runs_without_record(record_calls: list[str]) -> None:
    provider, reader, recorder = _provider(AggregationTemporality.CUMULATIVE)
    try:
        for n in range(RUN * 3 + 1):
            recorder.record(n / 1000, {"k": "v"}, otel_context.get_current())
        recorder.flush()
        assert record_calls == []
        assert [(p.count, p.max) for p in _points(reader.get_metrics_data(), "d")] == [(RUN * 3 + 1, RUN * 3 / 1000)]
    finally:
        provider.shutdown()


async def test_uninstrument_hands_on_what_was_pending(broker: Broker, name: str) -> None:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    tracer_provider = TracerProvider()
    queue = Queue(f"{name}.q", auto_delete=True)
    seen, handle = acked_bodies()

    telemetry.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        consumer = await broker.consume(queue, handle)
        try:
            for n in range(3):
                await broker.publish(Envelope(body=b"%d" % n), routing_key=queue.name)
            await wait_for(lambda: len(seen) == 3)
            await asyncio.sleep(0.05)  # the hook's own bookkeeping after the handler
        finally:
            await consumer.cancel()
    finally:
        telemetry.uninstrument()
    try:
        assert [p.count for p in _points(reader.get_metrics_data(), "messaging.process.duration")] == [3]
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()
