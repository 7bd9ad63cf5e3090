"""Seams for optional instrumentation: ``amqpkit.telemetry.instrument()`` sets these, ``uninstrument()`` clears them.

Each is ``None`` until then, and the core checks ``if _hooks.x is not None``
before calling one: without instrumentation a publish or a delivery pays one
global lookup and nothing else. This module imports nothing, so amqpkit runs
without OpenTelemetry installed.

- ``publish(broker, envelope, exchange, routing_key, mandatory, confirm, timeout)``: awaited in place of
  ``Broker.publish``; it sends through ``Broker._publish``, the core below this hook.
- ``consume(consumer, delivery)``: awaited in place of ``consumer.callback(delivery)``.
- ``rpc_call(client, method, payload, returns, timeout, headers)``: awaited in place of ``RpcClient.call``;
  it calls ``RpcClient._call``, the core below this hook, with ``quiet`` set (the request's publish is not
  traced again).
- ``handler_failed(exc)``: a handler raised and the pattern handled it (RPC error reply).
- ``retry(headers, exc)`` / ``dead_letter(headers, reason, exc)``: a work-queue task is about to be copied to a
  delay queue / the DLQ with ``headers`` (the hook may add to them).
- ``retried()`` / ``dead_lettered(reason)``: the copy is stored (or, for ``dead_lettered``, the broker was left
  to dead-letter the task); counted only then, since the copy may yet be refused or fail (the task requeued).
- ``outbox_add(headers)``: ``Outbox.add`` is storing a row with ``headers`` (its own dict); the hook writes the
  current trace context into them (``traceparent``/``tracestate``) when a span is current.
- ``relayed(headers)``: a context manager the outbox relay publishes a row in; it makes the trace context the
  row's ``headers`` carry current, so the PRODUCER span is a child of the span that added the row.
- ``disconnected(broker)`` / ``reconnected(broker, seconds)``: a Broker lost its connection / got it back;
  ``closed(broker)``: it was closed.
- ``quiet``: a ``contextvars.ContextVar[bool]`` once instrumented; set while ``rpc_call``'s own call runs, so
  the request's publish is not traced as a message of its own.
"""

from typing import Any

publish: Any = None
consume: Any = None
rpc_call: Any = None
handler_failed: Any = None
retry: Any = None
retried: Any = None
dead_letter: Any = None
dead_lettered: Any = None
outbox_add: Any = None
relayed: Any = None
disconnected: Any = None
reconnected: Any = None
closed: Any = None
quiet: Any = None
