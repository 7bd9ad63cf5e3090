#!/usr/bin/env python
"""Streams tutorial 2, offset tracking: append messages to 'stream-offset-tracking', the last one a marker."""

import argparse
import asyncio
import os

from amqpkit import Broker, BrokerSettings, Exchange, Publisher, Queue, QueueType, TextCodec

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"

STREAM = Queue("stream-offset-tracking", type=QueueType.STREAM, max_length_bytes=2_000_000_000)


async def main(url: str, count: int) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        await broker.declare_queue(STREAM)
        stream = Publisher(broker, Exchange(""), TextCodec())
        # Sent together, confirmed together: the broker writes them to the stream in this order.
        await asyncio.gather(
            *(stream.publish(f"message {i}", routing_key=STREAM.name) for i in range(count - 1)),
        )
        await stream.publish("marker", routing_key=STREAM.name)  # last, after every other one is confirmed
        print(f" [x] Sent {count} messages, the last one the marker")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    parser.add_argument("--count", type=int, default=100, help="how many messages, the marker included (100)")
    args = parser.parse_args()
    if args.count < 1:
        parser.error("--count must be at least 1")
    asyncio.run(main(args.url, args.count))
