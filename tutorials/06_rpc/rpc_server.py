#!/usr/bin/env python
"""Tutorial 6, RPC: serve fib(n) on the queue 'rpc_queue'; the reply goes to reply_to with the correlation id."""

import argparse
import asyncio
import os

from amqpkit import Broker, BrokerSettings, Queue, RpcServer
from amqpkit.runner import run_until_signal

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


async def on_request(body: str) -> str:
    # As in the official tutorial: the request is the decimal n, the reply str(fib(n)).
    n = int(body)
    print(f" [.] fib({n})")
    return str(fib(n))


async def main(url: str, stop: asyncio.Event) -> None:
    async with Broker(BrokerSettings(url=url)) as broker:
        # prefetch 1 and a plain queue, as the official server declares it.
        server = RpcServer(broker, Queue("rpc_queue", durable=False), concurrency=1)
        server.add("fib", on_request)
        async with server:
            print(" [x] Awaiting RPC requests")
            await stop.wait()
    print("Interrupted")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    url = parser.parse_args().url
    raise SystemExit(run_until_signal(lambda stop: main(url, stop)))
