"""A JSON body nested deeper than Python's recursion limit, from another client, into a Subscriber and an RpcClient.

Python's ``json.loads`` reads arrays and objects by recursion: a body of 3,000
``[`` and as many ``]`` (6 KB) raises ``RecursionError``, not the
``JSONDecodeError`` that :class:`~amqpkit.JsonCodec` turns into
:class:`~amqpkit.DecodeError`. pydantic reads it iteratively (a typed handler
is not concerned); :class:`~amqpkit.JsonCodec` is what ``AutoCodec(Any)``
uses: a handler without an annotation or annotated ``Any``, an iterated
Subscriber, an RpcClient call without ``returns``.

What the users are promised: a body that does not decode is rejected (dead-lettered
when the queue has a DLX) and the subscriber goes on; every RPC call ends with its
result or a typed error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest

from amqpkit import (
    Broker,
    DecodeError,
    Delivery,
    Envelope,
    Exchange,
    Queue,
    RemoteError,
    RpcClient,
    Subscriber,
)

from ..waiting import wait_for

DEEP = b"[" * 3000 + b"]" * 3000  # 6 KB; json.loads raises RecursionError past ~1,000 levels


@pytest.mark.parametrize("form", ["unannotated", "any", "iterated"])
async def test_deeply_nested_bodies_do_not_stall_a_subscriber(
    broker: Broker, name: str, cleanup: list[str], form: str
) -> None:
    """Each deep body stays unacknowledged for good (the consumer's last net logs it and settles nothing), holding
    a prefetch slot: ``prefetch`` of them and the subscriber receives nothing more, silently."""
    got: list[Any] = []

    async def unannotated(doc) -> None:  # type: ignore[no-untyped-def]
        got.append(doc)

    async def any_value(doc: Any) -> None:
        got.append(doc)

    handler = {"unannotated": unannotated, "any": any_value, "iterated": None}[form]
    queue = f"{name}.q"
    cleanup += [f"q:{queue}", f"x:{name}"]
    sub: Subscriber[Any] = Subscriber(broker, Exchange(name, type="fanout"), handler, queue=queue, prefetch=2)
    async with sub:
        reading: asyncio.Future[None] | None = None
        if handler is None:

            async def read() -> None:
                async for delivery in sub:
                    got.append(delivery.value)
                    await delivery.ack()

            reading = asyncio.ensure_future(read())
        for _ in range(2):  # as many as the prefetch
            await broker.publish(Envelope(DEEP, content_type="application/json"), exchange=name)
        for i in range(5):
            await broker.publish(Envelope(b'{"n": %d}' % i, content_type="application/json"), exchange=name)
        try:
            await wait_for(lambda: len(got) == 5, 5)
        except AssertionError:
            pass
        finally:
            if reading is not None:
                reading.cancel()
            ready, consumers = await broker.queue_counts(queue)
        assert len(got) == 5, (
            f"{len(got)} of 5 good messages handled in 5 s; {ready} ready in the queue ({consumers} consumer)"
        )
        # Rejected like any body that does not decode.
        assert sub.rejected == 2, (sub.rejected, sub.handled, sub.failed)


@contextlib.asynccontextmanager
async def deep_server(broker: Broker, name: str, content_type: str) -> AsyncIterator[str]:
    """Another client's server on an exclusive queue of the test's: it answers every request with ``DEEP`` under
    ``content_type``. Yields the request queue's name."""
    requests = Queue(f"{name}.rpc", exclusive=True)

    async def serve(request: Delivery[bytes]) -> None:
        reply = Envelope(DEEP, content_type=content_type, correlation_id=request.correlation_id)
        await broker.publish(reply, routing_key=request.reply_to or "", confirm=False)

    server = await broker.consume(requests, serve, auto_ack=True)
    try:
        yield requests.name
    finally:
        await server.cancel()


@pytest.mark.parametrize("reply_queue", ["direct", "exclusive"])
async def test_a_deeply_nested_reply_ends_the_call_with_a_typed_error(
    broker: Broker, name: str, reply_queue: Literal["direct", "exclusive"]
) -> None:
    """A server (another client's) replies with a deep JSON document: the call raised RecursionError; it is now
    a DecodeError, as for any reply that does not decode."""
    async with (
        deep_server(broker, name, "application/json") as requests,
        RpcClient(broker, requests, reply_queue=reply_queue) as client,
    ):
        with pytest.raises(DecodeError, match="nested too deeply"):  # as any reply that does not decode
            await client.call("anything", 1, timeout=5)
        assert client.pending == 0


async def test_a_deeply_nested_error_reply_ends_the_call_with_a_typed_error(broker: Broker, name: str) -> None:
    """The same document under amqpkit's error content type: read by ``parse_error``, which caught ValueError,
    KeyError and TypeError only (the call raised RecursionError); now an unreadable RemoteError."""
    async with (
        deep_server(broker, name, "application/vnd.amqpkit.error+json") as requests,
        RpcClient(broker, requests) as client,
    ):
        with pytest.raises(RemoteError) as refused:  # as any error document it cannot read
            await client.call("anything", 1, timeout=5)
        assert refused.value.remote_type == "UnreadableError"
