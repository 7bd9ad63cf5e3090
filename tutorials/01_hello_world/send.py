#!/usr/bin/env python
"""Tutorial 1, "Hello World!": send one message to the queue 'hello'."""

import argparse
import asyncio
import os

from amqpkit import Broker, BrokerSettings, Exchange, Publisher, Queue, TextCodec

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"


async def main(url: str) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        # Same declaration as the official tutorial: a plain, non-durable queue.
        await broker.declare_queue(Queue("hello", durable=False))
        hello = Publisher(broker, Exchange(""), TextCodec(), persistent=False)
        await hello.publish("Hello World!", routing_key="hello")
        print(" [x] Sent 'Hello World!'")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    asyncio.run(main(parser.parse_args().url))
