"""Instrumentation for ``amqpkit bench --otel``: each mode set up the same way in the driver and every serving process.

- ``off``: :func:`amqpkit.telemetry.instrument` never called (or undone): the core's hooks stay ``None``;
- ``noop``: ``instrument()`` with the SDK's TracerProvider (every span recorded, handed to an exporter
  that drops it, synchronously: SimpleSpanProcessor) and MeterProvider (metrics aggregated in memory);
- ``batch``: the same with a BatchSpanProcessor (spans queued, exported in batches by its thread) whose
  exporter drops them: what an OTLP exporter costs before the network.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

__all__ = ["OTEL_MODES", "available", "set_up"]

OTEL_MODES = ("off", "noop", "batch")

_providers: list[Any] = []  # what the current mode made, shut down when the mode changes


def available() -> bool:
    """Whether the OpenTelemetry SDK (the ``otel`` extra) is installed."""
    if importlib.util.find_spec("opentelemetry") is None:
        return False
    return importlib.util.find_spec("opentelemetry.sdk") is not None


def set_up(mode: str) -> None:
    """Instrument this process for ``mode`` (after undoing the previous mode's set-up)."""
    if mode not in OTEL_MODES:
        raise ValueError(f"unknown otel mode {mode!r}; valid: {', '.join(OTEL_MODES)}")
    _undo()
    if mode == "off":
        return
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult

    from .. import telemetry

    class Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    processor = SimpleSpanProcessor(Drop()) if mode == "noop" else BatchSpanProcessor(Drop())
    tracer_provider.add_span_processor(processor)
    meter_provider = MeterProvider([InMemoryMetricReader()])
    telemetry.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    _providers.extend((tracer_provider, meter_provider))


def _undo() -> None:
    if not _providers:
        return
    from .. import telemetry

    telemetry.uninstrument()
    while _providers:
        _providers.pop().shutdown()
