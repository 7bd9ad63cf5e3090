#!/usr/bin/env python
"""Tutorial 3, publish/subscribe: print every log line sent to the fanout exchange 'logs'."""

import argparse
import asyncio
import os

from amqpkit import Broker, BrokerSettings, Exchange, Subscriber
from amqpkit.runner import run_until_signal

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
LOGS = Exchange("logs", type="fanout", durable=False)


async def callback(body: bytes) -> None:
    print(f" [x] {body!r}")


async def main(url: str, stop: asyncio.Event) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        # queue=None: a private, server-named, exclusive queue, so each receiver gets every message.
        logs = Subscriber(broker, LOGS, callback)
        await logs.declare()
        print(" [*] Waiting for logs. To exit press CTRL+C")
        async with logs:
            await stop.wait()
    print("Interrupted")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    url = parser.parse_args().url
    raise SystemExit(run_until_signal(lambda stop: main(url, stop)))
