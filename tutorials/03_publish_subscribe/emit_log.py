#!/usr/bin/env python
"""Tutorial 3, publish/subscribe: broadcast a log line to every listener on the fanout exchange 'logs'."""

import argparse
import asyncio
import os

from amqpkit import Broker, BrokerSettings, Exchange, Publisher, TextCodec

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
LOGS = Exchange("logs", type="fanout", durable=False)


async def main(url: str, message: str) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        await Publisher(broker, LOGS, TextCodec(), persistent=False).publish(message)
        print(f" [x] Sent {message}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    parser.add_argument("message", nargs="*", help="the log line (default: 'info: Hello World!')")
    args = parser.parse_args()
    asyncio.run(main(args.url, " ".join(args.message) or "info: Hello World!"))
