"""A JSON body nested 100,000 arrays deep, sent by another client to a service whose handlers take ``Any``.

Found by a hunt. ``JsonCodec.decode`` (the codec of a handler typed ``Any``, or not typed) turns only
``JSONDecodeError`` and ``UnicodeDecodeError`` into ``DecodeError``; ``json.loads`` of a deep array raises
``RecursionError``. The pattern's decode-error path is skipped: the consumer's callback fails ("callback
failed", a traceback), and the delivery is neither dead-lettered, rejected nor answered. It stays
unacknowledged for as long as the channel lives, holding a prefetch slot (a worker of concurrency N takes
nothing more after N such bodies), and comes back after every reconnect. A body typed as a model or a
``list`` goes through pydantic, whose parser refuses the depth with a DecodeError, and is dead-lettered.
Measured on 3.10.8 and 4.0.5: each of the three stays unacked (1 each in ``messages_unacknowledged``), the
RPC caller gets no reply in 10 s; good messages after it are served.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest
from pamqp.commands import Basic

from amqpkit import Broker, Exchange
from amqpkit.service import Service
from amqpkit.testing import ServiceRunner

from ..waiting import until

DEEP = b"[" * 100_000 + b"]" * 100_000


def deep_service() -> Service:
    svc = Service("deep")

    @svc.worker("deep.jobs", concurrency=2)
    async def work(job: Any) -> None: ...

    @svc.subscriber(Exchange("deep.events", type="fanout"), queue="deep.events")
    async def listen(event: Any) -> None: ...

    @svc.rpc("deep.rpc")
    async def echo(value: Any) -> Any:
        return value

    return svc


@pytest.fixture
async def raw(amqp_url: str) -> AsyncIterator[Any]:
    conn = await aiormq.connect(amqp_url)
    yield await conn.channel()
    await conn.close()


def props(**kw: Any) -> Basic.Properties:
    return Basic.Properties(content_type="application/json", message_id="deep", **kw)


async def test_a_deep_body_is_dead_lettered_rejected_and_answered(
    service_runner: ServiceRunner, amqp_broker: Broker, raw: Any
) -> None:
    running = await service_runner(deep_service())
    reply = await raw.queue_declare(exclusive=True)
    replies: asyncio.Queue[Any] = asyncio.Queue()
    await raw.basic_consume(reply.queue, replies.put_nowait, no_ack=True)

    await raw.basic_publish(DEEP, routing_key="deep.jobs", properties=props(delivery_mode=2))
    await raw.basic_publish(DEEP, exchange="deep.events", properties=props())
    await raw.basic_publish(
        DEEP, routing_key="deep.rpc", properties=props(reply_to=reply.queue, correlation_id="c", message_type="echo")
    )
    answer = None
    with contextlib.suppress(TimeoutError):
        answer = await asyncio.wait_for(replies.get(), 10)

    async def seen() -> tuple[int, list[int], list[int], bool]:
        dead = (await amqp_broker.queue_counts("deep.jobs.dlq"))[0]
        return (
            dead,
            [w.dead_lettered for w in running.workers.values()],
            [s.rejected for s in running.subscribers.values()],
            answer is not None and b"DecodeError" in answer.body,
        )

    with contextlib.suppress(AssertionError):
        await until(lambda: _equal(seen(), (1, [1], [1], True)), timeout=5)
    # (in the DLQ, dead-lettered by the worker, rejected by the subscriber, answered with a DecodeError)
    assert await seen() == (1, [1], [1], True)


async def _equal(got: Any, wanted: Any) -> bool:
    return bool(await got == wanted)
