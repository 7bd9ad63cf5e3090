"""amqpkit: asyncio messaging patterns for RabbitMQ (AMQP 0-9-1)."""

from ._version import __version__
from .codec import AutoCodec, BytesCodec, Codec, JsonCodec, PydanticCodec, TextCodec, codec_for
from .connection import Broker, Consumer
from .context import TaskContext
from .errors import (
    AmqpkitError,
    ConnectError,
    ConnectionLost,
    DecodeError,
    HandlerCrashed,
    InvalidMessage,
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
from .message import Delivery, Envelope, MessageProperties, Settlement
from .patterns.confirms import ConfirmingPublisher, Outcome
from .patterns.pubsub import Publisher, Subscriber
from .patterns.routing import topic_matches
from .patterns.rpc import RpcClient, RpcServer
from .patterns.work_queue import (
    IdempotencyStore,
    MemoryIdempotencyStore,
    Reject,
    Retry,
    RetryPolicy,
    TaskEvent,
    TaskStatus,
    Worker,
    WorkQueue,
)
from .service import Service, ServiceContext, ServiceError
from .settings import BrokerSettings, ReconnectPolicy, TlsSettings, redact_url
from .topology import Binding, DeadLetterStrategy, Exchange, ExchangeType, Overflow, Queue, QueueType

__all__ = [
    "AmqpkitError",
    "AutoCodec",
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
    "HandlerCrashed",
    "IdempotencyStore",
    "InvalidMessage",
    "JsonCodec",
    "MemoryIdempotencyStore",
    "MessageProperties",
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
    "Reject",
    "RemoteError",
    "Retry",
    "RetryPolicy",
    "RpcClient",
    "RpcError",
    "RpcServer",
    "RpcTimeout",
    "Service",
    "ServiceContext",
    "ServiceError",
    "Settlement",
    "SettlementError",
    "Subscriber",
    "TaskContext",
    "TaskEvent",
    "TaskStatus",
    "TextCodec",
    "TlsSettings",
    "TopologyError",
    "Unroutable",
    "WorkQueue",
    "Worker",
    "__version__",
    "codec_for",
    "redact_url",
    "topic_matches",
]
