#!/usr/bin/env python
"""Tutorial 6, RPC: ask the server on 'rpc_queue' for fib(n) and print the answer."""

import argparse
import asyncio
import os
import sys

from amqpkit import Broker, BrokerSettings, RpcClient, RpcError, TextCodec

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"


async def main(url: str, n: int, timeout: float) -> int:
    async with (
        Broker(BrokerSettings(url=url)) as broker,
        # An exclusive reply queue and a plain-text body, as in the official client.
        RpcClient(broker, "rpc_queue", codec=TextCodec(), reply_queue="exclusive", timeout=timeout) as fibonacci_rpc,
    ):
        print(f" [x] Requesting fib({n})")
        try:
            response = await fibonacci_rpc.call(None, str(n), returns=int)
        except RpcError as exc:
            print(f" [!] {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(f" [.] Got {response}")
        return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply (default: 30)")
    parser.add_argument("n", nargs="?", type=int, default=30, help="which Fibonacci number (default: 30)")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.url, args.n, args.timeout)))
