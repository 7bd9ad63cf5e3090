"""Telemetry for the shop's processes (amqpkit.telemetry), on when ``SHOP_TRACES`` names a folder.

Each process then exports its finished spans as JSON lines to
``<SHOP_TRACES>/<service>-<pid>.jsonl`` (a small exporter of the example's
own, standing in for an OTLP collector), and ``python -m examples.shop
trace ORDER`` draws the one trace of an order from those files. Without
``SHOP_TRACES`` (or without OpenTelemetry installed) nothing is
instrumented.

An event the outbox's relay publishes stays in the trace of the request
that wrote it: amqpkit stores the trace context with the row
(``Outbox.add``) and the relay publishes under it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    HAVE_OTEL = True
except ImportError:  # pragma: no cover - amqpkit[otel] not installed: no tracing
    HAVE_OTEL = False

_enabled = False


def enabled() -> bool:
    return _enabled


if HAVE_OTEL:

    class JsonLinesExporter(SpanExporter):
        """Appends each finished span to a file, one JSON object per line."""

        def __init__(self, path: Path) -> None:
            self.path = path

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            with self.path.open("a", encoding="utf-8") as out:
                for span in spans:
                    out.write(json.dumps(span_record(span)) + "\n")
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass


def span_record(span: Any) -> dict[str, Any]:
    """The parts of a span the trace drawing needs."""
    ctx = span.context
    return {
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name", "?"),
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "start": span.start_time,
        "end": span.end_time,
        "attributes": {k: v for k, v in (span.attributes or {}).items() if isinstance(v, str | int | float | bool)},
    }


def setup_tracing(service_name: str) -> None:
    """Instrument this process when ``SHOP_TRACES`` is set (once; called at the top of each service module)."""
    global _enabled
    folder = os.environ.get("SHOP_TRACES")
    if _enabled or not folder or not HAVE_OTEL:
        return
    from amqpkit import telemetry

    Path(folder).mkdir(parents=True, exist_ok=True)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(
        SimpleSpanProcessor(JsonLinesExporter(Path(folder) / f"{service_name}-{os.getpid()}.jsonl"))
    )
    trace.set_tracer_provider(provider)
    telemetry.instrument(tracer_provider=provider)
    _enabled = True


@contextlib.contextmanager
def server_span(name: str) -> Iterator[str]:
    """A SERVER span around an HTTP request when tracing is on; yields the trace id (a fresh id when off)."""
    if not _enabled:
        yield os.urandom(16).hex()
        return
    tracer = trace.get_tracer("examples.shop.gateway")
    with tracer.start_as_current_span(name, kind=trace.SpanKind.SERVER) as span:
        yield f"{span.get_span_context().trace_id:032x}"
