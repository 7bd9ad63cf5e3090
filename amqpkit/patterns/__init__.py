"""The messaging patterns, each a class or two built on :class:`~amqpkit.Broker`."""

from .pubsub import Publisher, Subscriber
from .routing import topic_matches

__all__ = ["Publisher", "Subscriber", "topic_matches"]
