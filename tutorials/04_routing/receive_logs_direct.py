#!/usr/bin/env python
"""Tutorial 4, routing: print the log lines of the given severities from the direct exchange 'direct_logs'."""

import argparse
import asyncio
import os
import sys

from amqpkit import Broker, BrokerSettings, Delivery, Exchange, Subscriber
from amqpkit.runner import run_until_signal

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
DIRECT_LOGS = Exchange("direct_logs", type="direct", durable=False)


async def callback(delivery: Delivery[bytes]) -> None:
    print(f" [x] {delivery.routing_key}:{delivery.value!r}")


async def main(url: str, severities: list[str], stop: asyncio.Event) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        logs = Subscriber(broker, DIRECT_LOGS, callback, binding_keys=severities)
        await logs.declare()
        print(" [*] Waiting for logs. To exit press CTRL+C")
        async with logs:
            await stop.wait()
    print("Interrupted")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    parser.add_argument("severity", nargs="*", help="severities to receive, e.g. info warning error")
    args = parser.parse_args()
    if not args.severity:
        sys.stderr.write(f"Usage: {sys.argv[0]} [info] [warning] [error]\n")
        raise SystemExit(1)
    raise SystemExit(run_until_signal(lambda stop: main(args.url, args.severity, stop)))
