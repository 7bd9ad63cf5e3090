"""The messaging patterns, each a class or two built on :class:`~amqpkit.Broker`."""

from .confirms import ConfirmingPublisher, Outcome
from .pubsub import Publisher, Subscriber
from .routing import topic_matches
from .rpc import RpcClient, RpcServer

__all__ = ["ConfirmingPublisher", "Outcome", "Publisher", "RpcClient", "RpcServer", "Subscriber", "topic_matches"]
