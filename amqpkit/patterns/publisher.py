"""The sending half of publish/subscribe: a :class:`Publisher` of values of one type to one exchange.

The receiving half, :class:`~amqpkit.Subscriber`, is in :mod:`amqpkit.patterns.pubsub`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, Self

from typing_extensions import TypeVar  # with a default (PEP 696)

from ..codec import AutoCodec, Codec, encode_body
from ..connection import Broker
from ..message import Envelope
from ..topology import Exchange

__all__ = ["Publisher"]

# Any when nothing says (no codec given): `Publisher(broker, x).publish(model)` needs no annotation.
T = TypeVar("T", default=Any)


class Publisher(Generic[T]):
    """Publishes values of one type to one exchange, each waiting for its publisher confirm.

    ``Publisher(broker, Exchange("logs", type="fanout"), TextCodec())``.
    The exchange is declared on first use (the default exchange ``""`` never is).
    """

    def __init__(
        self,
        broker: Broker,
        exchange: Exchange | str,
        codec: Codec[T] | None = None,
        *,
        persistent: bool = True,
        confirm: bool = True,
        mandatory: bool = False,
        app_id: str | None = None,
    ) -> None:
        self.broker = broker
        self.exchange = Exchange(exchange) if isinstance(exchange, str) else exchange
        self.codec: Codec[T] = codec if codec is not None else AutoCodec()
        self.persistent = persistent
        self.confirm = confirm
        self.mandatory = mandatory
        self.app_id = app_id
        self._declared = self.exchange.is_builtin

    async def __aenter__(self) -> Self:
        await self.declare()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def declare(self) -> None:
        if not self._declared:
            await self.broker.declare_exchange(self.exchange)
            self._declared = True

    async def publish(
        self,
        value: T,
        *,
        routing_key: str = "",
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        type: str | None = None,
        persistent: bool | None = None,
        mandatory: bool | None = None,
        expiration: float | None = None,
        priority: int | None = None,
        timeout: float | None = None,
    ) -> str:
        """Encode and publish ``value``; returns its message id once the broker confirmed it.

        Raises :class:`~amqpkit.Unroutable` (mandatory, and no queue took it),
        :class:`~amqpkit.PublishNacked`, :class:`~amqpkit.PublishTimeout`,
        :class:`~amqpkit.MessageTooLarge`, :class:`~amqpkit.InvalidMessage` (a property or header AMQP
        cannot carry; nothing was sent).
        """
        if not self._declared:
            await self.declare()
        body, content_type = encode_body(self.codec, value)
        envelope = Envelope(
            body,
            content_type=content_type,
            headers=dict(headers) if headers else {},
            correlation_id=correlation_id,
            type=type,
            persistent=self.persistent if persistent is None else persistent,
            expiration=expiration,
            priority=priority,
            app_id=self.app_id,
        )
        if message_id is not None:
            envelope.message_id = message_id
        await self.broker.publish(
            envelope,
            exchange=self.exchange.name,
            routing_key=routing_key,
            mandatory=self.mandatory if mandatory is None else mandatory,
            confirm=self.confirm,
            timeout=timeout,
        )
        return envelope.message_id or ""
