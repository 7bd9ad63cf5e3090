#!/usr/bin/env python
"""Tutorial 1, "Hello World!": print every message that arrives in the queue 'hello'."""

import argparse
import asyncio
import os

from amqpkit import Broker, BrokerSettings, Exchange, Queue, Subscriber
from amqpkit.runner import run_until_signal

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"


async def callback(body: bytes) -> None:
    print(f" [x] Received {body!r}")


async def main(url: str, stop: asyncio.Event) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        # The default exchange delivers to the queue named by the routing key.
        hello = Subscriber(broker, Exchange(""), callback, queue=Queue("hello", durable=False))
        await hello.declare()
        print(" [*] Waiting for messages. To exit press CTRL+C")
        async with hello:
            await stop.wait()
    print("Interrupted")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    url = parser.parse_args().url
    raise SystemExit(run_until_signal(lambda stop: main(url, stop)))
