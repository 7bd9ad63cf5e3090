"""Instrumentation with the SDK's in-memory span exporter and metric reader, turned off after each test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from amqpkit import telemetry

from ..outbox.conftest import backend, pg_schema, pg_url, store  # noqa: F401  (the outbox's stores, on each backend)


@dataclass
class Telemetry:
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider | None = None

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name]

    def metric(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, value) of each point of metric ``name``; value is the sum, or the count for a histogram."""
        points: list[tuple[dict[str, Any], Any]] = []
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        for p in m.data.data_points:
                            value = getattr(p, "value", None)
                            points.append((dict(p.attributes or {}), cast(Any, p).count if value is None else value))
        return points

    def total(self, name: str) -> Any:
        return sum(v for _, v in self.metric(name))


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    yield from instrumented()


def instrumented(sampler: Any = None) -> Iterator[Telemetry]:
    """Instruments amqpkit with in-memory span and metric readers (and ``sampler``); undone after the yield."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield Telemetry(exporter, reader, tracer_provider)
    finally:
        telemetry.uninstrument()
        tracer_provider.shutdown()
        meter_provider.shutdown()
