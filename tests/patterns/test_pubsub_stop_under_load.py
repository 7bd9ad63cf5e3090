"""A Subscriber stopped while its queue has a backlog: deliveries the broker sent before its answer to the
basic.cancel start callbacks after the stop began. They were neither waited for nor cancelled: they ran on past
the stop, and an ack sent after the channel's close reached the broker on a channel it had let go of, which then
closed the whole connection (504 CHANNEL_ERROR, "expected 'channel.open'"), every other consumer with it (3 of 8
stops in a hunt, 3.10.8 and 4.0.5)."""

from __future__ import annotations

import asyncio

from amqpkit import Broker, BrokerSettings, Exchange, Publisher, Subscriber

ROUNDS = 6


async def test_a_stop_with_a_backlog_runs_no_handler_after_it_and_keeps_the_connection(
    settings: BrokerSettings, name: str, cleanup: list[str]
) -> None:
    exchange = Exchange(name, type="fanout")
    queue = f"{name}.q"
    cleanup += [f"q:{queue}", f"x:{name}"]
    stopped = False
    late: list[int] = []  # handlers of the stopped subscription that began after its stop() returned

    async def handler(doc: dict[str, int]) -> None:
        if stopped:
            late.append(doc["i"])
        await asyncio.sleep(0.002)

    async def bystander_handler(doc: dict[str, int]) -> None:
        await asyncio.sleep(0.002)

    async with Broker(settings) as broker, Broker(settings) as other:
        publisher = Publisher(other, exchange)
        async with Subscriber(broker, exchange, bystander_handler, prefetch=10) as bystander:  # on the same Broker
            for _ in range(ROUNDS):
                stopped = False
                sub = Subscriber(broker, exchange, handler, queue=queue, prefetch=10)
                await sub.start()
                for i in range(0, 1000, 50):
                    await asyncio.gather(*(publisher.publish({"i": i + k}) for k in range(50)))
                await sub.stop()
                stopped = True
                await asyncio.sleep(0.2)
                assert not late, f"{len(late)} handlers began after the stop returned"
                assert broker.reconnects == 0, "a stop closed the whole connection"
            assert bystander.handled > 0
