"""instrument() and uninstrument(): the hooks in :mod:`amqpkit._hooks` and the log record factory, set and cleared."""

from __future__ import annotations

import logging
from typing import Any

from .. import _hooks
from . import hooks
from .instruments import Instruments
from .logs import record_factory

_old_record_factory: Any = None


def instrument(tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Trace and measure every Broker and pattern in this process (again, with these providers, if called twice).

    ``None`` uses the global providers (``opentelemetry.trace.set_tracer_provider``
    and ``opentelemetry.metrics.set_meter_provider``).
    """
    global _old_record_factory
    if hooks.current is not None:
        uninstrument()
    hooks.current = Instruments(tracer_provider, meter_provider)
    _old_record_factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(record_factory(_old_record_factory))
    _hooks.quiet = hooks.QUIET
    _hooks.publish = hooks.publish
    _hooks.consume = hooks.consume
    _hooks.rpc_call = hooks.rpc_call
    _hooks.handler_failed = hooks.handler_failed
    _hooks.retry = hooks.retry
    _hooks.retried = hooks.retried
    _hooks.dead_letter = hooks.dead_letter
    _hooks.dead_lettered = hooks.dead_lettered
    _hooks.outbox_add = hooks.outbox_add
    _hooks.relayed = hooks.relayed
    _hooks.disconnected = hooks.disconnected
    _hooks.reconnected = hooks.reconnected
    _hooks.closed = hooks.closed


def uninstrument() -> None:
    """Turn instrumentation off; the core goes back to its uninstrumented path."""
    global _old_record_factory
    _hooks.publish = None
    _hooks.consume = None
    _hooks.rpc_call = None
    _hooks.handler_failed = None
    _hooks.retry = None
    _hooks.retried = None
    _hooks.dead_letter = None
    _hooks.dead_lettered = None
    _hooks.outbox_add = None
    _hooks.relayed = None
    _hooks.disconnected = None
    _hooks.reconnected = None
    _hooks.closed = None
    if _old_record_factory is not None:
        logging.setLogRecordFactory(_old_record_factory)
        _old_record_factory = None
    if hooks.current is not None:
        hooks.current.flush()  # the durations measured so far reach their histograms now
    hooks.current = None


def instrumented() -> bool:
    """Whether :func:`instrument` is in effect."""
    return hooks.current is not None
