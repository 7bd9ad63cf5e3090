"""Logging for amqpkit's commands: one line per event, to stdout, plain or JSON.

The library itself only emits through the ``amqpkit.*`` loggers and never
configures logging; applications keep control. The CLI calls
:func:`configure_logging`.

The client libraries underneath (aiormq, aio-pika) log the same events
amqpkit logs, a connection cut for one, in their own words and with a
traceback each time. Their records are left out below CRITICAL, so that
amqpkit's own line tells each event once; ``verbose`` shows everything,
down to DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

__all__ = ["JsonFormatter", "QuietLibraries", "configure_logging"]

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
QUIET_LOGGERS = ("aiormq", "aio_pika")


class QuietLibraries(logging.Filter):
    """Drops records of the client libraries (``aiormq``, ``aio_pika`` and their children) below CRITICAL."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return True
        return not any(record.name == name or record.name.startswith(name + ".") for name in QUIET_LOGGERS)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ISO 8601), level, logger, message.

    With an exception, ``error`` says what it was (type: text) and ``traceback``
    holds the whole traceback as one string; JSON escapes its newlines, so a
    record never spans two lines. Records made inside a span (with
    ``amqpkit.telemetry`` instrumented) add ``trace_id`` and ``span_id``.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", None)  # set by amqpkit.telemetry inside a span
        if trace_id is not None:
            doc["trace_id"] = trace_id
            doc["span_id"] = getattr(record, "span_id", None)
        if record.exc_info and record.exc_info[1] is not None:
            doc["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            doc["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(
    *,
    json_lines: bool = False,
    level: int = logging.INFO,
    stream: TextIO | None = None,
    verbose: bool = False,
) -> None:
    """Send log records to ``stream`` (stdout by default), one line each (plain or JSON).

    aiormq's and aio-pika's records below CRITICAL are left out; ``verbose``
    keeps them and lowers the level to DEBUG.
    """
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(PLAIN_FORMAT))
    if not verbose:
        handler.addFilter(QuietLibraries())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else level)
