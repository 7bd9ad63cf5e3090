#!/usr/bin/env python
"""Tutorial 2, work queues: put a task on the durable queue 'task_queue' (one second of work per dot)."""

import argparse
import asyncio
import os

from amqpkit import Broker, BrokerSettings, Queue, TextCodec, WorkQueue

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
# The official tutorial's queue: classic and durable, with no arguments.
TASK_QUEUE = Queue("task_queue", durable=True)


async def main(url: str, message: str) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        tasks = WorkQueue(broker, "task_queue", TextCodec(), queue=TASK_QUEUE)
        await tasks.enqueue(message)  # persistent, and confirmed by the broker
        print(f" [x] Sent {message}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    parser.add_argument("message", nargs="*", help="the task; each '.' is one second of work (default: 'Hello World!')")
    args = parser.parse_args()
    asyncio.run(main(args.url, " ".join(args.message) or "Hello World!"))
