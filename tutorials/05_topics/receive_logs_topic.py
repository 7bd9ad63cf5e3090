#!/usr/bin/env python
"""Tutorial 5, topics: print the log lines whose routing key matches the given patterns ('*' one word, '#' any)."""

import argparse
import asyncio
import os
import sys

from amqpkit import Broker, BrokerSettings, Delivery, Exchange, Subscriber
from amqpkit.runner import run_until_signal

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
TOPIC_LOGS = Exchange("topic_logs", type="topic", durable=False)


async def callback(delivery: Delivery[bytes]) -> None:
    print(f" [x] {delivery.routing_key}:{delivery.value!r}")


async def main(url: str, binding_keys: list[str], stop: asyncio.Event) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        logs = Subscriber(broker, TOPIC_LOGS, callback, binding_keys=binding_keys)
        await logs.declare()
        print(" [*] Waiting for logs. To exit press CTRL+C")
        async with logs:
            await stop.wait()
    print("Interrupted")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    parser.add_argument("binding_key", nargs="*", help="patterns such as 'kern.*' or '*.critical' or '#'")
    args = parser.parse_args()
    if not args.binding_key:
        sys.stderr.write(f"Usage: {sys.argv[0]} [binding_key]...\n")
        raise SystemExit(1)
    raise SystemExit(run_until_signal(lambda stop: main(args.url, args.binding_key, stop)))
