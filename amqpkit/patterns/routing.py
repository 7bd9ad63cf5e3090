"""Routing helpers: what a binding key accepts, and which routing keys a topic pattern matches.

Direct and topic routing use :class:`~amqpkit.patterns.pubsub.Publisher` and
:class:`~amqpkit.patterns.pubsub.Subscriber` with a direct or topic exchange;
this module holds the rules, written out so they can be tested and shown.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["check_routing_key", "topic_matches"]

MAX_KEY_BYTES = 255


def check_routing_key(key: str) -> str:
    """``key`` if the broker will take it as a routing or binding key, else ``ValueError``."""
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"routing keys are at most {MAX_KEY_BYTES} bytes: {key[:40]!r}...")
    return key


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic exchange routes ``routing_key`` to a binding with ``pattern``.

    Both are dot-separated words. ``*`` stands for exactly one word; ``#`` for
    zero or more words. The empty key is a key of zero words.
    """
    return _match(tuple(pattern.split(".")) if pattern else (), tuple(routing_key.split(".")) if routing_key else ())


@lru_cache(maxsize=4096)
def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        # '#' takes zero words, or one word and stays.
        return _match(rest, words) or (bool(words) and _match(pattern, words[1:]))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])
