#!/usr/bin/env python
"""Tutorial 7, publisher confirms: publish N messages with each strategy and print how long each took."""

import argparse
import asyncio
import os
import time
import uuid

from amqpkit import Broker, BrokerSettings, ConfirmingPublisher, Queue, TextCodec

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"


async def timed(broker: Broker, count: int, *, window: int, batch: bool = False) -> tuple[float, int]:
    """Publish ``count`` messages to a fresh queue; returns (milliseconds, failures)."""
    queue = await broker.declare_queue(Queue(f"confirms.{uuid.uuid4()}", durable=False, auto_delete=False))
    publisher = ConfirmingPublisher(broker, "", TextCodec(), window=window, batch=batch, persistent=False)
    started = time.perf_counter()
    async with publisher:
        for i in range(count):
            await publisher.publish(str(i), routing_key=queue)
    took = (time.perf_counter() - started) * 1000
    await broker.delete_queue(queue)
    return took, publisher.failed


async def main(url: str, count: int, batch_size: int, window: int) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        ms, failed = await timed(broker, count, window=1)
        print(f"Published {count:,} messages individually in {ms:,.0f} ms" + (f" ({failed} failed)" if failed else ""))
        ms, failed = await timed(broker, count, window=batch_size, batch=True)
        print(f"Published {count:,} messages in batch in {ms:,.0f} ms" + (f" ({failed} failed)" if failed else ""))
        ms, failed = await timed(broker, count, window=window)
        print(
            f"Published {count:,} messages and handled confirms asynchronously in {ms:,.0f} ms"
            + (f" ({failed} failed)" if failed else "")
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    parser.add_argument("--count", type=int, default=50_000, help="messages per strategy (default: 50,000)")
    parser.add_argument("--batch-size", type=int, default=100, help="batch size (default: 100)")
    parser.add_argument("--window", type=int, default=1000, help="outstanding confirms, async (default: 1000)")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.count, args.batch_size, args.window))
