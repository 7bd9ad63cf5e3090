#!/usr/bin/env python
"""Tutorial 5, topics: send a log line with a routing key like 'kern.critical' to the topic exchange 'topic_logs'."""

import argparse
import asyncio
import os

from amqpkit import Broker, BrokerSettings, Exchange, Publisher, TextCodec

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
TOPIC_LOGS = Exchange("topic_logs", type="topic", durable=False)


async def main(url: str, routing_key: str, message: str) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        await Publisher(broker, TOPIC_LOGS, TextCodec(), persistent=False).publish(message, routing_key=routing_key)
        print(f" [x] Sent {routing_key}:{message}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    parser.add_argument("words", nargs="*", help="[routing.key] [message...]")
    words = parser.parse_args().words
    # As in the official tutorial: the first word is the key only when a message follows it.
    routing_key = words[0] if len(words) > 1 else "anonymous.info"
    asyncio.run(main(parser.parse_args().url, routing_key, " ".join(words[1:]) or "Hello World!"))
