"""The messaging patterns, each a class or two built on :class:`~amqpkit.Broker`."""

from .confirms import ConfirmingPublisher, Outcome
from .pubsub import Publisher, Subscriber
from .routing import topic_matches
from .rpc import RpcClient, RpcServer
from .work_queue import (
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

__all__ = [
    "ConfirmingPublisher",
    "IdempotencyStore",
    "MemoryIdempotencyStore",
    "Outcome",
    "Publisher",
    "Reject",
    "Retry",
    "RetryPolicy",
    "RpcClient",
    "RpcServer",
    "Subscriber",
    "TaskEvent",
    "TaskStatus",
    "WorkQueue",
    "Worker",
    "topic_matches",
]
