"""What the RPC hot path does per call (issue 18: amqpkit's own overhead at one call in flight).

Each test pins one thing the fast path does or leaves out: properties not
sent, a timer not armed, the order in which the reply and the ack leave.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import pytest
from aiormq.abc import AbstractChannel

from amqpkit import Broker, aiormq_compat

from ..waiting import wait_for


class _PublishSpy:
    """Records the timeout each publish is handed to aiormq with; ``forward=False`` sends nothing."""

    def __init__(self, *, forward: bool = True) -> None:
        self.timeouts: list[float | None] = []
        self.release: asyncio.Event | None = None
        self.forward = forward
        self.original = aiormq_compat.publish_nowait

    async def __call__(self, channel: AbstractChannel, body: bytes, **kwargs: Any) -> None:
        self.timeouts.append(kwargs.get("timeout"))
        if self.release is not None and len(self.timeouts) == 1:
            await self.release.wait()  # the first publish waits (as for room in a full write queue)
        if self.forward:
            await self.original(channel, body, **kwargs)


async def test_an_unconfirmed_publish_arms_no_timer_when_the_write_queue_has_room(
    broker: Broker, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _PublishSpy()
    monkeypatch.setattr(aiormq_compat, "publish_nowait", spy)
    properties = aiormq.spec.Basic.Properties()
    for _ in range(3):
        await broker.lowlevel.publish_unconfirmed(b"x", properties, routing_key=f"{name}.nowhere")
    assert spy.timeouts == [None, None, None]


async def test_an_unconfirmed_publish_is_bounded_when_the_write_queue_is_full(
    broker: Broker, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _PublishSpy(forward=False)  # aiormq's own put would wait on the queue said to be full
    monkeypatch.setattr(aiormq_compat, "publish_nowait", spy)
    properties = aiormq.spec.Basic.Properties()
    await broker.lowlevel.publish_unconfirmed(b"x", properties, routing_key=f"{name}.nowhere")  # opens its channel
    channel = await broker.lowlevel.open_channel()
    try:
        monkeypatch.setattr(channel.connection.write_queue, "full", lambda: True)
        await broker.lowlevel.publish_unconfirmed(b"x", properties, routing_key=f"{name}.nowhere")
        await broker.lowlevel.publish_unconfirmed(b"x", properties, routing_key=f"{name}.nowhere", timeout=3)
    finally:
        monkeypatch.undo()
        await channel.close()
    assert spy.timeouts == [None, broker.settings.publish_timeout, 3]


async def test_an_unconfirmed_publish_is_bounded_while_another_one_waits(
    broker: Broker, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish behind another one that waits may wait for the channel's lock: it keeps its timeout."""
    spy = _PublishSpy()
    spy.release = asyncio.Event()
    monkeypatch.setattr(aiormq_compat, "publish_nowait", spy)
    properties = aiormq.spec.Basic.Properties()
    first = asyncio.create_task(broker.lowlevel.publish_unconfirmed(b"1", properties, routing_key=f"{name}.nowhere"))
    await wait_for(lambda: len(spy.timeouts) == 1, 5)
    second = asyncio.create_task(broker.lowlevel.publish_unconfirmed(b"2", properties, routing_key=f"{name}.nowhere"))
    await wait_for(lambda: len(spy.timeouts) == 2, 5)
    spy.release.set()
    await asyncio.gather(first, second)
    assert spy.timeouts == [None, broker.settings.publish_timeout]
    await broker.lowlevel.publish_unconfirmed(b"3", properties, routing_key=f"{name}.nowhere")
    assert spy.timeouts[-1] is None  # the count of publishes in flight went back down
