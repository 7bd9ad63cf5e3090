"""Trace ids in logs: log records made while a span is current get ``trace_id`` and ``span_id`` attributes."""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace


def record_factory(old: Any) -> Any:
    """A log record factory that calls ``old`` and adds the current span's ids to the record."""

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = old(*args, **kwargs)
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return record

    return factory
