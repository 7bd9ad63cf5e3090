"""Topology as data: frozen specs for exchanges, queues and bindings.

A pattern describes what it needs with these specs; the :class:`~amqpkit.Broker`
declares them, remembers them, and declares them again after a reconnect.
Durations are seconds (floats); they are turned into the broker's
milliseconds here, in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal

from .message import as_doubles

__all__ = [
    "Binding",
    "DeadLetterStrategy",
    "Exchange",
    "ExchangeType",
    "Overflow",
    "Queue",
    "QueueType",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})

# The enums' values, accepted wherever the enum is (``Exchange("x", type="topic")``); a spec
# always holds the enum member after construction.
ExchangeTypeName = Literal["fanout", "direct", "topic", "headers"]
QueueTypeName = Literal["classic", "quorum", "stream"]
OverflowName = Literal["drop-head", "reject-publish", "reject-publish-dlx"]
DeadLetterStrategyName = Literal["at-most-once", "at-least-once"]


class ExchangeType(StrEnum):
    FANOUT = "fanout"
    DIRECT = "direct"
    TOPIC = "topic"
    HEADERS = "headers"


class QueueType(StrEnum):
    CLASSIC = "classic"
    QUORUM = "quorum"
    STREAM = "stream"


class Overflow(StrEnum):
    """What a queue at its max length does with a new message."""

    DROP_HEAD = "drop-head"
    REJECT_PUBLISH = "reject-publish"
    REJECT_PUBLISH_DLX = "reject-publish-dlx"


class DeadLetterStrategy(StrEnum):
    AT_MOST_ONCE = "at-most-once"
    AT_LEAST_ONCE = "at-least-once"


def _check_name(kind: str, name: object) -> None:
    """TypeError or ValueError for a name AMQP cannot carry (a short string: at most 255 bytes of UTF-8), where the
    spec is made rather than at its declare (pamqp's "Max length exceeded for queue", or a TypeError of len())."""
    if not isinstance(name, str):
        raise TypeError(f"a {kind} name must be text, not {type(name).__name__}")
    if len(name) > 63:  # 255 bytes need at least 64 characters: a shorter name is always short enough
        size = len(name.encode("utf-8", "surrogatepass"))
        if size > 255:
            raise ValueError(f"{kind} name is {size} bytes in UTF-8; AMQP carries at most 255: {name[:40]!r}...")


def _freeze(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping)) if mapping else _EMPTY


@dataclass(frozen=True, slots=True)
class Exchange:
    """An exchange. The default exchange is ``Exchange("")`` and is never declared."""

    name: str
    type: ExchangeType | ExchangeTypeName = ExchangeType.DIRECT
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, hash=False)

    def __post_init__(self) -> None:
        _check_name("exchange", self.name)
        object.__setattr__(self, "type", ExchangeType(self.type))
        object.__setattr__(self, "arguments", _freeze(self.arguments))
        if self.name.startswith("amq.") and not self.is_builtin:
            raise ValueError(f"exchange names starting with 'amq.' are reserved: {self.name!r}")

    @property
    def is_default(self) -> bool:
        return self.name == ""

    @property
    def is_builtin(self) -> bool:
        return self.name in _BUILTIN_EXCHANGES


_BUILTIN_EXCHANGES = frozenset(
    {"", "amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match", "amq.rabbitmq.trace"}
)


@dataclass(frozen=True, slots=True, eq=False)
class Queue:
    """A queue. ``name=""`` asks the broker to name it (a fresh name after every reconnect).

    Its type is always declared (``x-queue-type``), ``classic`` too, so a vhost's default queue type does not
    make it another one; a queue that exists with another type is a :class:`~amqpkit.TopologyError`.

    Named queues compare by value; server-named ones by identity, since two of
    them are always two different queues.
    """

    name: str = ""
    type: QueueType | QueueTypeName = QueueType.CLASSIC
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    message_ttl: float | None = None
    expires: float | None = None
    max_length: int | None = None
    max_length_bytes: int | None = None
    overflow: Overflow | OverflowName | None = None
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    delivery_limit: int | None = None
    dead_letter_strategy: DeadLetterStrategy | DeadLetterStrategyName | None = None
    single_active_consumer: bool = False
    arguments: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def __post_init__(self) -> None:
        _check_name("queue", self.name)
        object.__setattr__(self, "type", QueueType(self.type))
        object.__setattr__(self, "arguments", _freeze(self.arguments))
        if self.overflow is not None:
            object.__setattr__(self, "overflow", Overflow(self.overflow))
        if self.dead_letter_strategy is not None:
            object.__setattr__(self, "dead_letter_strategy", DeadLetterStrategy(self.dead_letter_strategy))
        problems = self._problems()
        if problems:
            raise ValueError(f"queue {self.name!r}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems: list[str] = []
        if self.type is not QueueType.CLASSIC:
            if not self.durable:
                problems.append(f"{self.type} queues must be durable")
            if self.exclusive:
                problems.append(f"{self.type} queues cannot be exclusive")
            if self.auto_delete:
                problems.append(f"{self.type} queues cannot be auto-delete")
            if not self.name:
                problems.append(f"{self.type} queues need a name")
        if self.delivery_limit is not None and self.type is not QueueType.QUORUM:
            problems.append("delivery_limit needs a quorum queue")
        if self.dead_letter_strategy is DeadLetterStrategy.AT_LEAST_ONCE:
            if self.type is not QueueType.QUORUM:
                problems.append("at-least-once dead-lettering needs a quorum queue")
            if self.overflow not in (Overflow.REJECT_PUBLISH, None):
                problems.append("at-least-once dead-lettering needs overflow reject-publish")
        # What the broker would refuse at the declare (406 "invalid arg", closing the channel it came on), or
        # amqpkit could not write (a nan or an infinity in milliseconds), said here, where the spec is made.
        if self.message_ttl is not None and not 0 <= self.message_ttl < math.inf:
            problems.append(f"message_ttl must be a number of seconds, 0 or more, not {self.message_ttl!r}")
        if self.expires is not None and not (0 < self.expires < math.inf and round(self.expires * 1000) >= 1):
            problems.append(f"expires must be a number of seconds, 0.001 or more, not {self.expires!r}")
        for name in ("max_length", "max_length_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"{name} must not be negative, not {value!r}")
        return problems

    @property
    def server_named(self) -> bool:
        return self.name == ""

    def declare_arguments(self) -> dict[str, Any]:
        """The ``x-`` arguments this spec declares, as the broker wants them."""
        # The type always, classic too: a vhost's default queue type (``add_vhost --default-queue-type``) makes a
        # queue declared without one a quorum queue or a stream, and a classic queue made before the default was
        # set is then refused at its next declare (406 inequivalent arg 'x-queue-type').
        args: dict[str, Any] = {"x-queue-type": str(self.type)}
        if self.message_ttl is not None:
            args["x-message-ttl"] = round(self.message_ttl * 1000)
        if self.expires is not None:
            args["x-expires"] = round(self.expires * 1000)
        if self.max_length is not None:
            args["x-max-length"] = self.max_length
        if self.max_length_bytes is not None:
            args["x-max-length-bytes"] = self.max_length_bytes
        overflow = self.overflow
        if self.dead_letter_strategy is DeadLetterStrategy.AT_LEAST_ONCE and overflow is None:
            overflow = Overflow.REJECT_PUBLISH
        if overflow is not None:
            args["x-overflow"] = str(overflow)
        if self.dead_letter_exchange is not None:
            args["x-dead-letter-exchange"] = self.dead_letter_exchange
        if self.dead_letter_routing_key is not None:
            args["x-dead-letter-routing-key"] = self.dead_letter_routing_key
        if self.delivery_limit is not None:
            args["x-delivery-limit"] = self.delivery_limit
        if self.dead_letter_strategy is not None:
            args["x-dead-letter-strategy"] = str(self.dead_letter_strategy)
        if self.single_active_consumer:
            args["x-single-active-consumer"] = True
        args.update(self.arguments)
        return args

    def _key(self) -> tuple[Any, ...]:
        return (
            self.name,
            self.type,
            self.durable,
            self.exclusive,
            self.auto_delete,
            tuple(sorted(self.declare_arguments().items())),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Queue):
            return NotImplemented
        if self.server_named or other.server_named:
            return self is other
        return self._key() == other._key()

    def __hash__(self) -> int:
        return id(self) if self.server_named else hash(self.name)


@dataclass(frozen=True, slots=True)
class Binding:
    """Binds a queue to an exchange by routing key, or by header match on a headers exchange.

    ``headers`` given means a header match; ``match`` is ``"all"`` or ``"any"``.
    """

    exchange: Exchange
    queue: Queue
    routing_key: str = ""
    headers: Mapping[str, Any] | None = field(default=None, hash=False)
    match: str = "all"

    def __post_init__(self) -> None:
        if self.match not in ("all", "any"):
            raise ValueError(f"match must be 'all' or 'any', not {self.match!r}")
        if self.headers is not None:
            if self.exchange.type is not ExchangeType.HEADERS:
                raise ValueError("a header match needs a headers exchange")
            object.__setattr__(self, "headers", _freeze(self.headers))
        if self.exchange.is_default:
            raise ValueError("queues cannot be bound to the default exchange")

    def bind_arguments(self) -> dict[str, Any]:
        if self.headers is None:
            return {}
        # floats as doubles, as amqpkit sends them in a message's headers: a float binding sent as pamqp's 32-bit
        # float would not match the double a message carries (19.99 is not the same number in both)
        return as_doubles({"x-match": self.match, **self.headers})
