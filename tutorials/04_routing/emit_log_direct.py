#!/usr/bin/env python
"""Tutorial 4, routing: send a log line with a severity to the direct exchange 'direct_logs'."""

import argparse
import asyncio
import os

from amqpkit import Broker, BrokerSettings, Exchange, Publisher, TextCodec

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
DIRECT_LOGS = Exchange("direct_logs", type="direct", durable=False)


async def main(url: str, severity: str, message: str) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        await Publisher(broker, DIRECT_LOGS, TextCodec(), persistent=False).publish(message, routing_key=severity)
        print(f" [x] Sent {severity}:{message}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    parser.add_argument("severity", nargs="?", default="info", help="routing key (default: info)")
    parser.add_argument("message", nargs="*", help="the log line (default: 'Hello World!')")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.severity, " ".join(args.message) or "Hello World!"))
