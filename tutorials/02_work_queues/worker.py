#!/usr/bin/env python
"""Tutorial 2, work queues: take tasks from 'task_queue' one at a time, one second of work per dot, then ack."""

import argparse
import asyncio
import os

from amqpkit import Broker, BrokerSettings, Queue, TextCodec, Worker, WorkQueue
from amqpkit.runner import run_until_signal

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
TASK_QUEUE = Queue("task_queue", durable=True)


async def callback(body: str) -> None:
    print(f" [x] Received {body}")
    await asyncio.sleep(body.count("."))
    print(" [x] Done")


async def main(url: str, stop: asyncio.Event) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        tasks = WorkQueue(broker, "task_queue", TextCodec(), queue=TASK_QUEUE)
        await tasks.declare()
        print(" [*] Waiting for messages. To exit press CTRL+C")
        # concurrency=1 is the tutorial's prefetch_count=1: a busy worker is given no more tasks.
        async with Worker(tasks, callback, concurrency=1, grace=10):
            await stop.wait()
    print("Interrupted")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    url = parser.parse_args().url
    raise SystemExit(run_until_signal(lambda stop: main(url, stop)))
