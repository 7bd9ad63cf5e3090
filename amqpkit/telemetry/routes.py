"""Routes: what every span and count to one destination shares, built once per destination and kept.

A route holds the span's name and kind, the attributes known before sampling (those the sampler is
shown), whether the destination's last span recorded, and its metric cells (see :class:`~.instruments.Tally`),
so that a message costs dictionary look-ups rather than string formatting and attribute building.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind

if TYPE_CHECKING:
    from .instruments import Instruments

ROUTES_KEPT = 1024
"""Routes (names, attributes and metric cells per destination) kept per kind; past that the cache starts over."""


class SendRoute:
    """What every publish to one (exchange, routing key) shares: span name, attributes known before sampling."""

    __slots__ = ("attributes", "name", "published", "recording")

    def __init__(self, state: Instruments, exchange: str, routing_key: str) -> None:
        self.name = f"send {_destination(exchange, routing_key)}"
        self.attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": exchange,
        }
        if routing_key:
            self.attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
        self.recording = False  # whether the last span recorded (see hooks.publish)
        self.published = state.published.cell(
            (("messaging.destination.name", exchange), ("messaging.system", "rabbitmq"))
        )


class ProcessRoute:
    """What every delivery from one queue, exchange and routing key (and RPC method) shares."""

    __slots__ = ("acked", "attributes", "consumed", "duration_attributes", "in_flight", "key", "kind", "name",
                 "recording", "task")  # fmt: skip

    def __init__(
        self, state: Instruments, queue: str, exchange: str, routing_key: str, method: str | None, server: bool
    ) -> None:
        # A server-named queue (a private subscription's amq.gen-...) is one of many: names and metrics use the
        # exchange.
        target = queue if not queue.startswith("amq.") else (exchange or "(default)")
        self.attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": exchange,
            "messaging.destination.subscription.name": queue,
        }
        if routing_key:
            self.attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
        if server:
            self.attributes["rpc.service"] = queue
            self.attributes["rpc.method"] = method or ""
            self.name, self.kind = (f"{queue}/{method}" if method else queue), SpanKind.SERVER
        else:
            self.name, self.kind = f"process {target}", SpanKind.CONSUMER
        self.task = not server  # a work-queue attempt number is read from the headers
        self.recording = False  # whether the last span recorded (see hooks.publish)
        self.key = (("messaging.destination.subscription.name", target), ("messaging.system", "rabbitmq"))
        self.duration_attributes = dict(self.key)
        self.consumed = state.consumed.cell(self.key)
        self.in_flight = state.in_flight.cell(self.key)
        self.acked = state.acked.cell(self.key)


class CallRoute:
    """What every RPC call to one queue and method shares."""

    __slots__ = ("attributes", "method", "name", "outcomes", "service")

    def __init__(self, exchange: str, queue: str, method: str | None, reply_queue: str) -> None:
        self.name = f"{queue}/{method}" if method else queue
        self.service = queue
        self.method = method or ""
        self.attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": exchange,
            "rpc.service": queue,
            "rpc.method": self.method,
            "amqpkit.rpc.reply_queue": reply_queue,
        }
        if queue:
            self.attributes["messaging.rabbitmq.destination.routing_key"] = queue
        self.outcomes: dict[str, dict[str, str]] = {}

    def outcome(self, outcome: str) -> dict[str, str]:
        found = self.outcomes.get(outcome)
        if found is None:
            found = {"rpc.service": self.service, "rpc.method": self.method, "amqpkit.rpc.outcome": outcome}
            if len(self.outcomes) < 64:  # exception class names: few, but not ours to bound
                self.outcomes[outcome] = found
        return found


def _destination(exchange: str, routing_key: str) -> str:
    if exchange:
        return exchange
    # The default exchange routes by queue name; a server-named queue (amq.gen-..., a reply queue) is
    # one of many, so the span name does not carry it.
    if routing_key and not routing_key.startswith("amq."):
        return routing_key
    return "(default)"
