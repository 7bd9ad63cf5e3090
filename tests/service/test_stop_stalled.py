"""A stop on a connection gone silent (packets dropped, no RST): the grace counts from the stop, and it ends."""

from __future__ import annotations

import asyncio
import time

from amqpkit import Broker, Delivery, Envelope, Queue

from ..reliability.proxy import FaultProxy, proxied_settings


async def test_a_stop_on_a_stalled_connection_keeps_to_its_grace(proxy: FaultProxy, amqp_url: str, name: str) -> None:
    """A consumer stopped with a grace of 1 s while its connection is stalled (the heartbeat, 60 s here, has not
    noticed). Before: the basic.cancel's answer was waited for 5 s before the grace began: the callback was
    cancelled 6 s after the stop, which ended then (`amqpkit run --grace 1` took 8.2 s to end). Expected: the
    callback cancelled at the grace (1 s), the stop over within the grace and 3 s (2 s here)."""
    queue = Queue(f"{name}.stalled", auto_delete=False)
    running = asyncio.Event()
    cancelled_at: list[float] = []

    async def slow(delivery: Delivery[bytes]) -> None:
        running.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled_at.append(time.monotonic())
            raise

    async with Broker(proxied_settings(proxy, amqp_url, heartbeat=60)) as b:
        try:
            consumer = await b.consume(queue, slow)
            await b.publish(Envelope(b"x"), routing_key=queue.name)
            await asyncio.wait_for(running.wait(), 10)
            proxy.stall()
            began = time.monotonic()
            await asyncio.wait_for(consumer.cancel(grace=1), 30)
            took = time.monotonic() - began
            assert cancelled_at, "the callback was not cancelled"
            assert cancelled_at[0] - began < 3, f"cancelled {cancelled_at[0] - began:.1f} s after the stop"
            assert took < 5.5, f"the stop took {took:.1f} s"  # grace 1 s + 3 steps of 1 s (STOP_STEP), and a margin
        finally:
            proxy.resume()
            proxy.cut()  # the stalled connection is left behind: the Broker's next one is clean
    async with Broker(proxied_settings(proxy, amqp_url)) as b:
        await b.delete_queue(queue.name)
