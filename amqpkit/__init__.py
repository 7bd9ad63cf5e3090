"""amqpkit: asyncio messaging patterns for RabbitMQ (AMQP 0-9-1)."""

from ._version import __version__
from .codec import BytesCodec, Codec, JsonCodec, PydanticCodec, TextCodec, codec_for
from .connection import Broker, Consumer
from .errors import (
    AmqpkitError,
    ConnectError,
    ConnectionLost,
    DecodeError,
    MessageTooLarge,
    NoResponder,
    PublishError,
    PublishNacked,
    PublishTimeout,
    RemoteError,
    RpcError,
    RpcTimeout,
    SettlementError,
    TopologyError,
    Unroutable,
)
from .message import Delivery, Envelope, Settlement
from .patterns.confirms import ConfirmingPublisher, Outcome
from .patterns.pubsub import Publisher, Subscriber
from .patterns.routing import topic_matches
from .patterns.rpc import RpcClient, RpcServer
from .settings import BrokerSettings, ReconnectPolicy, TlsSettings, redact_url
from .topology import Binding, DeadLetterStrategy, Exchange, ExchangeType, Overflow, Queue, QueueType

__all__ = [
    "AmqpkitError",
    "Binding",
    "Broker",
    "BrokerSettings",
    "BytesCodec",
    "Codec",
    "ConfirmingPublisher",
    "ConnectError",
    "ConnectionLost",
    "Consumer",
    "DeadLetterStrategy",
    "DecodeError",
    "Delivery",
    "Envelope",
    "Exchange",
    "ExchangeType",
    "JsonCodec",
    "MessageTooLarge",
    "NoResponder",
    "Outcome",
    "Overflow",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "Publisher",
    "PydanticCodec",
    "Queue",
    "QueueType",
    "ReconnectPolicy",
    "RemoteError",
    "RpcClient",
    "RpcError",
    "RpcServer",
    "RpcTimeout",
    "Settlement",
    "SettlementError",
    "Subscriber",
    "TextCodec",
    "TlsSettings",
    "TopologyError",
    "Unroutable",
    "__version__",
    "codec_for",
    "redact_url",
    "topic_matches",
]
