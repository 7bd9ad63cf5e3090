"""Publisher and Subscriber against the real broker."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest
from pydantic import BaseModel

from amqpkit import (
    Broker,
    BrokerSettings,
    Delivery,
    Envelope,
    Exchange,
    JsonCodec,
    Publisher,
    Queue,
    Subscriber,
    TextCodec,
    Unroutable,
    topic_matches,
)

from ..brokerctl import close_connections
from ..waiting import until_ready, wait_for
from .test_routing import TABLE


class Order(BaseModel):
    id: int
    item: str


async def test_fanout_reaches_every_private_subscriber_in_order(broker: Broker, name: str) -> None:
    logs = Exchange(f"{name}.logs", type="fanout", durable=False, auto_delete=True)
    seen: list[list[int]] = [[], [], []]

    def make(i: int):  # type: ignore[no-untyped-def]
        async def handler(n: int) -> None:
            seen[i].append(n)

        return handler

    subs = [Subscriber(broker, logs, make(i)) for i in range(3)]
    for s in subs:
        await s.start()
    assert len({s.queue_name for s in subs}) == 3
    assert all(s.private for s in subs)
    pub = Publisher(broker, logs, JsonCodec(), persistent=False)
    for n in range(1000):
        await pub.publish(n)
    await wait_for(lambda: all(len(x) == 1000 for x in seen))
    for x in seen:
        assert x == list(range(1000))
    for s in subs:
        await s.stop()


async def test_typed_handler_with_pydantic_model(broker: Broker, name: str) -> None:
    ex = Exchange(f"{name}.orders", type="direct", durable=False, auto_delete=True)
    got: asyncio.Queue[Order] = asyncio.Queue()

    async def on_order(order: Order) -> None:
        await got.put(order)

    async with Subscriber(broker, ex, on_order, binding_keys=["eu"]):
        await Publisher(broker, ex, JsonCodec()).publish({"id": 1, "item": "lamp"}, routing_key="eu")
        order = await asyncio.wait_for(got.get(), 5)
    assert order == Order(id=1, item="lamp")


async def test_direct_with_several_binding_keys(broker: Broker, name: str) -> None:
    ex = Exchange(f"{name}.direct", type="direct", durable=False, auto_delete=True)
    got: list[str] = []

    async def handler(text: str) -> None:
        got.append(text)

    pub = Publisher(broker, ex, TextCodec())
    async with Subscriber(broker, ex, handler, binding_keys=["error", "warning"]):
        for severity in ["info", "warning", "error", "debug"]:
            await pub.publish(severity, routing_key=severity)
        # A last message, confirmed after the others: once it is in, anything else routed here is too.
        await pub.publish("end", routing_key="error")
        await wait_for(lambda: "end" in got)
    assert sorted(got) == ["end", "error", "warning"]


END = "<end of test>"  # not a routing key of the table


async def test_topic_routing_table(broker: Broker, name: str) -> None:
    """Every pattern of the routing table bound to a queue of its own; each key goes where the table says."""
    ex = Exchange(f"{name}.topic", type="topic", durable=False, auto_delete=True)
    patterns = sorted({p for p, _, _ in TABLE})
    keys = sorted({k for _, k, _ in TABLE})
    received: dict[str, list[str]] = {p: [] for p in patterns}
    subs = []
    for p in patterns:

        async def handler(key: str, p: str = p) -> None:
            received[p].append(key)

        subs.append(Subscriber(broker, ex, handler, binding_keys=[p]))
    # One queue with several bindings: a message matching two of them arrives once.
    multi: list[str] = []

    async def on_multi(key: str) -> None:
        multi.append(key)

    subs.append(Subscriber(broker, ex, on_multi, binding_keys=["*.orange.*", "*.*.rabbit", "lazy.#"]))
    for s in subs:
        await s.start()
    pub = Publisher(broker, ex, TextCodec(), persistent=False)
    for key in keys:
        await pub.publish(key, routing_key=key)
    expected = {p: sorted(k for k in keys if topic_matches(p, k)) for p in patterns}
    expected_multi = sorted(k for k in keys if any(topic_matches(p, k) for p in ["*.orange.*", "*.*.rabbit", "lazy.#"]))
    # Then a last message straight into each queue: once it is in, anything routed there before it is too.
    for s in subs:
        await broker.publish(Envelope(TextCodec().encode(END), content_type="text/plain"), routing_key=s.queue_name)
    await wait_for(lambda: all(END in v for v in received.values()) and END in multi)
    for got in [*received.values(), multi]:
        assert got[-1] == END
        got.remove(END)
    assert {p: sorted(v) for p, v in received.items()} == expected
    assert sorted(multi) == expected_multi
    # The table itself was checked against the broker: spot-check a few.
    assert "quick.orange.rabbit" in received["*.orange.*"]
    assert "" in received["#"]
    assert "a.z" in received["a.#.z"]
    # With the catch-all subscribers gone, a key that no remaining pattern matches is returned.
    for s in subs[:-1]:
        if s.bindings[0].routing_key in ("#", "#.#"):
            await s.stop()
    with pytest.raises(Unroutable) as info:
        await pub.publish("x", routing_key="nothing.binds.this.key.x", mandatory=True)
    assert info.value.exchange == ex.name
    assert info.value.routing_key == "nothing.binds.this.key.x"
    for s in subs:
        await s.stop()


async def test_headers_exchange_all_and_any(broker: Broker, name: str) -> None:
    ex = Exchange(f"{name}.headers", type="headers", durable=False, auto_delete=True)
    all_got: list[str] = []
    any_got: list[str] = []

    async def on_all(text: str) -> None:
        all_got.append(text)

    async def on_any(text: str) -> None:
        any_got.append(text)

    pub = Publisher(broker, ex, TextCodec())
    async with (
        Subscriber(broker, ex, on_all, headers={"format": "pdf", "type": "report"}, match="all"),
        Subscriber(broker, ex, on_any, headers={"format": "pdf", "type": "report"}, match="any"),
    ):
        await pub.publish("both", headers={"format": "pdf", "type": "report"})
        await pub.publish("format-only", headers={"format": "pdf", "type": "log"})
        await pub.publish("neither", headers={"format": "zip"})
        # A last message for both queues: once it is in, anything routed there before it is too.
        await pub.publish("end", headers={"format": "pdf", "type": "report"})
        await wait_for(lambda: "end" in all_got and "end" in any_got)
    assert all_got == ["both", "end"]
    assert sorted(any_got) == ["both", "end", "format-only"]


async def test_shared_subscription_each_message_handled_once(settings: BrokerSettings, name: str) -> None:
    ex = Exchange(f"{name}.events", type="topic")
    counts: Counter[int] = Counter()
    per_instance: list[int] = [0, 0, 0]

    def make(i: int):  # type: ignore[no-untyped-def]
        async def handler(n: int) -> None:
            counts[n] += 1
            per_instance[i] += 1
            await asyncio.sleep(0.001)

        return handler

    brokers = [Broker(settings) for _ in range(3)]
    for b in brokers:
        await b.connect()
    subs = [
        Subscriber(b, ex, make(i), binding_keys=["order.*"], queue=f"{name}.billing", prefetch=10)
        for i, b in enumerate(brokers)
    ]
    try:
        for s in subs:
            await s.start()
        assert not subs[0].private
        assert await brokers[0].queue_counts(f"{name}.billing") == (0, 3)
        pub = Publisher(brokers[0], ex, JsonCodec())
        await asyncio.gather(*(pub.publish(n, routing_key="order.created") for n in range(600)))
        await wait_for(lambda: sum(counts.values()) >= 600)
        # Stopped, the subscribers take nothing more; a message delivered but not acked would be back
        # in the queue. So after the stop the counts are final, and the queue must be empty.
        for s in subs:
            await s.stop()
        assert set(counts) == set(range(600))
        assert max(counts.values()) == 1
        assert all(n > 0 for n in per_instance), per_instance
        assert (await brokers[0].queue_counts(f"{name}.billing"))[0] == 0
    finally:
        for s in subs:
            await s.stop()
        await brokers[0].delete_queue(f"{name}.billing")
        await brokers[0].delete_exchange(ex)
        for b in brokers:
            await b.close()


async def test_failing_handler_dead_letters_and_keeps_going(
    broker: Broker, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    ex = Exchange(f"{name}.work", type="fanout", durable=False, auto_delete=True)
    dlx = Exchange(f"{name}.dlx", type="fanout", durable=False, auto_delete=True)
    dlq = Queue(f"{name}.dlq", auto_delete=False)
    await broker.declare(dlx, dlq)
    from amqpkit import Binding

    await broker.bind(Binding(dlx, dlq))
    handled: list[int] = []

    async def handler(n: int) -> None:
        if n % 3 == 0:
            raise ValueError(f"bad {n}")
        handled.append(n)

    caplog.set_level(logging.ERROR, logger="amqpkit")
    pub = Publisher(broker, ex, JsonCodec())
    try:
        async with Subscriber(broker, ex, handler, dead_letter_exchange=dlx.name) as sub:
            for n in range(1, 31):
                await pub.publish(n, message_id=f"m{n}")
            await wait_for(lambda: len(handled) == 20 and sub.failed == 10)
        assert handled == [n for n in range(1, 31) if n % 3]
        await until_ready(broker, dlq.name, 10)
        dead: list[int] = []
        while (d := await broker.get(dlq)) is not None:
            dead.append(JsonCodec().decode(d.body))
            assert d.headers["x-death"][0]["reason"] == "rejected"
            await d.ack()
        assert sorted(dead) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
        lines = [r.getMessage() for r in caplog.records if "handler failed" in r.getMessage()]
        assert len(lines) == 10
        assert any("id=m3 " in line and "ValueError: bad 3" in line for line in lines)
    finally:
        await broker.delete_queue(dlq)


async def test_undecodable_body_is_rejected_and_logged(
    broker: Broker, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    ex = Exchange(f"{name}.typed", type="fanout", durable=False, auto_delete=True)
    good: list[Order] = []

    async def handler(order: Order) -> None:
        good.append(order)

    caplog.set_level(logging.ERROR, logger="amqpkit")
    async with Subscriber(broker, ex, handler) as sub:
        await broker.publish(Envelope(b"{not json", content_type="application/json", message_id="bad1"), exchange=ex)
        await broker.publish(
            Envelope(b"\x80\x04K\x01.", content_type="application/python-pickle", message_id="bad2"), exchange=ex
        )
        await broker.publish(Envelope(b'{"id": "x"}', content_type="application/json", message_id="bad3"), exchange=ex)
        await Publisher(broker, ex, JsonCodec()).publish({"id": 5, "item": "ok"})
        await wait_for(lambda: len(good) == 1 and sub.rejected == 3)
    assert good == [Order(id=5, item="ok")]
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "id=bad1" in messages and "not valid JSON" in messages
    assert "id=bad2" in messages and "python-pickle" in messages
    assert "id=bad3" in messages and "does not match Order" in messages


async def test_iterator_form(broker: Broker, name: str) -> None:
    ex = Exchange(f"{name}.iter", type="fanout", durable=False, auto_delete=True)
    sub: Subscriber[str] = Subscriber(broker, ex, codec=TextCodec())
    got: list[str] = []
    async with sub:
        pub = Publisher(broker, ex, TextCodec())
        for word in ["a", "b", "c"]:
            await pub.publish(word)
        async for delivery in sub:
            got.append(delivery.value)
            await delivery.ack()
            if len(got) == 3:
                break
    assert got == ["a", "b", "c"]


async def test_handler_taking_delivery_settles_itself(broker: Broker, name: str, cleanup: list[str]) -> None:
    ex = Exchange(f"{name}.settle", type="fanout", durable=False, auto_delete=True)
    queue = f"{name}.settle.q"
    cleanup.append(f"q:{queue}")
    seen: list[tuple[str, bool]] = []

    async def handler(delivery: Delivery[str]) -> None:
        seen.append((delivery.value, delivery.redelivered))
        if not delivery.redelivered:
            await delivery.nack(requeue=True)  # once back to the queue, then acked by the subscriber

    async with Subscriber(broker, ex, handler, queue=queue):
        await Publisher(broker, ex, TextCodec()).publish("hello")
        await wait_for(lambda: len(seen) == 2)
    assert seen == [("hello", False), ("hello", True)]
    assert (await broker.queue_counts(queue))[0] == 0


@pytest.mark.whole_broker(vhost_only=True)
async def test_subscriber_survives_reconnect_without_duplicate_consumers(
    settings: BrokerSettings, amqp_url: str, name: str
) -> None:
    ex = Exchange(f"{name}.rc", type="fanout")
    queue = f"{name}.rc.q"
    got: list[int] = []

    async def handler(n: int) -> None:
        got.append(n)

    async with Broker(settings) as broker:
        try:
            async with Subscriber(broker, ex, handler, queue=queue) as sub:
                await Publisher(broker, ex, JsonCodec()).publish(1)
                await wait_for(lambda: got == [1])
                for _ in range(3):
                    generation = broker.generation
                    await close_connections(amqp_url, "pubsub reconnect test")
                    await wait_for(
                        lambda g=generation: (  # type: ignore[misc]
                            broker.generation > g and sub._consumer is not None and sub._consumer.attached.is_set()
                        )
                    )
                await Publisher(broker, ex, JsonCodec()).publish(2)
                await wait_for(lambda: got == [1, 2])
                assert await broker.queue_counts(queue) == (0, 1)
        finally:
            await broker.delete_queue(queue)
            await broker.delete_exchange(ex)
