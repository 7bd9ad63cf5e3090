"""Callbacks that keep what they are handed and ack it, for tests that only need to see what arrived."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from amqpkit import Delivery

Take = Callable[[Delivery[bytes]], Awaitable[None]]


def acked_bodies() -> tuple[list[bytes], Take]:
    """A list of the bodies delivered, and a callback that appends each delivery's body and acks it."""
    bodies: list[bytes] = []

    async def take(delivery: Delivery[bytes]) -> None:
        bodies.append(delivery.body)
        await delivery.ack()

    return bodies, take


def acked_offsets() -> tuple[list[int], Take]:
    """A list of the stream offsets delivered, and a callback that appends each delivery's offset and acks it."""
    offsets: list[int] = []

    async def take(delivery: Delivery[bytes]) -> None:
        offsets.append(int(delivery.headers["x-stream-offset"]))
        await delivery.ack()

    return offsets, take
