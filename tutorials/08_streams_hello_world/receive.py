#!/usr/bin/env python
"""Streams tutorial 1, "Hello World!": read the stream 'hello-stream' from its first message on, and keep reading."""

import argparse
import asyncio
import os

from amqpkit import Broker, BrokerSettings, Delivery, Queue, QueueType
from amqpkit.runner import run_until_signal

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"

STREAM = Queue("hello-stream", type=QueueType.STREAM, max_length_bytes=5_000_000_000)


async def callback(message: Delivery[bytes]) -> None:
    # The broker says where each message sits in the stream: the header x-stream-offset (0, 1, 2...).
    print(f" [x] Received {message.body!r} (offset {message.headers['x-stream-offset']})")
    # A stream consumer must ack: the acks are what let the broker send more (the prefetch below).
    # Acking does not remove anything: the message stays in the stream for the next reader.
    await message.ack()


async def main(url: str, stop: asyncio.Event) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        await broker.declare_queue(STREAM)
        print(" [*] Waiting for messages. To exit press CTRL+C")
        # Streams are read over AMQP 0-9-1 with a prefetch and manual acks (auto-ack is refused),
        # and x-stream-offset says where to start: "first" is the oldest message the stream still has.
        consumer = await broker.consume(STREAM, callback, prefetch=100, arguments={"x-stream-offset": "first"})
        try:
            await stop.wait()
        finally:
            await consumer.cancel()
    print("Interrupted")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    url = parser.parse_args().url
    raise SystemExit(run_until_signal(lambda stop: main(url, stop)))
