"""OpenTelemetry for amqpkit: traces across publish, consume, RPC and work queues; metrics; trace ids in logs.

Install the extra (``pip install 'amqpkit[otel]'``), then, once per process::

    from amqpkit.telemetry import instrument
    instrument()  # the global tracer and meter providers, or pass your own

Every Broker and pattern in the process is traced from then on, and
:func:`uninstrument` turns it off again. Without the extra nothing here is
imported: the core calls a handful of hooks in :mod:`amqpkit._hooks` that are
``None`` until :func:`instrument` sets them.

What is traced, following OpenTelemetry's messaging semantic conventions
(``messaging.system`` is ``rabbitmq``; the destination is the exchange):

- ``Broker.publish``: a PRODUCER span ``send <exchange>`` (the queue's name for
  the default exchange); W3C ``traceparent``/``tracestate`` go into the
  message's headers.
- every delivery a consumer takes (Subscriber, Worker, ``Broker.consume``): a
  CONSUMER span ``process <queue>`` whose parent is the context the message
  carries; a message without one starts a new trace, and a malformed
  ``traceparent`` is ignored (logged at DEBUG).
- ``RpcClient.call``: a CLIENT span ``<queue>/<method>`` that the reply ends;
  the RpcServer runs the handler in a SERVER span under it.
- a work-queue task: each attempt is its own CONSUMER span; a failed attempt
  says so (``error.type``), the copy sent to the delay queue or the DLQ is a
  PRODUCER span under it, so the trace runs through every retry into the
  DLQ, and attempts after the first carry a link to the first attempt's span
  (the ``x-trace-first-attempt`` header).
- an outbox row (:class:`~amqpkit.outbox.Outbox`): ``add`` stores the current
  trace context in the row's headers, and the relay, later and from a task of
  its own, publishes the row as a child of that span; so the PRODUCER span
  and every consumer's span stay in the trace of the request that wrote it.

Sampling: the sampler is shown, at each span's start, the attributes the semantic conventions call
sampling-relevant (system, operation, destination, routing key, subscription, RPC service and method). A span
the sampler drops still carries the trace context on (its message is counted and its logs get the ids), but
amqpkit builds none of the message's own attributes for it, so a ratio sampler makes the tracing cost
proportional. A destination whose last span recorded gets the next one's attributes in one pass at its start.
With the SDK's default sampler (``ParentBased``, unsampled parents dropped), a message whose context is already
not sampled makes no span at all: its context is passed on as it came, and the SDK is not asked.

Metrics go through the OpenTelemetry metrics API (:data:`METRICS` lists them).
Log records made while a span is current get ``trace_id`` and ``span_id``
attributes, and amqpkit's JSON log lines show them.

Modules: :mod:`.wiring` (instrument, uninstrument), :mod:`.hooks` (the spans and counts per message),
:mod:`.propagation` (trace context in headers), :mod:`.routes` (what each destination's spans share),
:mod:`.lean` (the per-message spans, without the SDK's ``Span`` class where nothing could tell),
:mod:`.instruments` (the tracer and metrics), :mod:`.logs` (trace ids in logs), :mod:`.prometheus`
(serve_metrics).
"""

from __future__ import annotations

try:
    import opentelemetry.metrics
    import opentelemetry.trace
    import opentelemetry.trace.propagation.tracecontext  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("amqpkit.telemetry needs OpenTelemetry: pip install 'amqpkit[otel]'") from exc

from . import hooks
from .instruments import METRICS
from .prometheus import MetricsServer, serve_metrics
from .propagation import FIRST_ATTEMPT_HEADER, extract
from .wiring import instrument, instrumented, uninstrument

# The two per-message hooks under the names scripts/otel_cost.py drives them by (its floor measurement).
_publish = hooks.publish
_consume = hooks.consume

__all__ = [
    "FIRST_ATTEMPT_HEADER",
    "METRICS",
    "MetricsServer",
    "extract",
    "instrument",
    "instrumented",
    "serve_metrics",
    "uninstrument",
]
