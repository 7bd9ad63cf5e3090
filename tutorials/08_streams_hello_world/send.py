#!/usr/bin/env python
"""Streams tutorial 1, "Hello World!": append a message to the stream 'hello-stream'."""

import argparse
import asyncio
import os

from amqpkit import Broker, BrokerSettings, Exchange, Publisher, Queue, QueueType, TextCodec

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"

# A stream is a queue type: an append-only log on disk, always durable. It keeps its messages after
# they are read, up to its retention (here: 5 GB, as in the official stream tutorial).
STREAM = Queue("hello-stream", type=QueueType.STREAM, max_length_bytes=5_000_000_000)


async def main(url: str, message: str) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        await broker.declare_queue(STREAM)  # x-queue-type: stream, x-max-length-bytes
        stream = Publisher(broker, Exchange(""), TextCodec())  # the default exchange routes by queue name
        await stream.publish(message, routing_key=STREAM.name)  # waits for the broker's confirm
        print(f" [x] Sent {message!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    parser.add_argument("message", nargs="*", help="the message (default: Hello, World!)")
    args = parser.parse_args()
    asyncio.run(main(args.url, " ".join(args.message) or "Hello, World!"))
