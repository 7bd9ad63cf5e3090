"""amqpkit's RPC against bare aiormq's at one call in flight, call by call: the two alternate in one run.

    .venv/bin/python scripts/rpc_paired.py [--calls 20000] [--blocks 20] [--loop asyncio|uvloop] [--out FILE]

The broker is ``AMQP_URL`` (default: guest on 127.0.0.1:5672); the serving process gets it through its
environment, never on its command line.

Run against run, a round trip of a millisecond on a small machine shared with the broker moves by a
third (what the host does, which core each process lands on), and a 5 % difference drowns in that:
``amqpkit bench --repeat 5`` gives per-repeat ratios from 0.8 to 1.4. Here both callers share one
process and both servers another, each over its own connection, and their calls alternate one by
one (A B B A A B ...), so each pair of calls meets the same machine. The scenarios are the bench's
own ``rpc`` (RpcClient.call over direct reply-to to an echoing RpcServer, bytes in and out) and
``raw-rpc`` (the same over bare aiormq), 128-byte bodies, one call in flight.

Printed: each one's median round trip, the ratio of the medians, the same ratio per block of
consecutive calls (how much it moves within the run), and the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from serving import broker_url, serving

from amqpkit.bench.base import ClientOptions, ServerOptions
from amqpkit.bench.loads import run_in_loop
from amqpkit.bench.scenarios import REGISTRY

KINDS = ("rpc", "raw-rpc")
WARMUP = 500


async def serve(url: str, queues: list[str]) -> None:
    """Both serving sides, in this one process, until a line arrives on stdin."""
    sides = [REGISTRY[kind].server(ServerOptions(url=url, queue=q)) for kind, q in zip(KINDS, queues, strict=True)]
    for side in sides:
        await side.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for side in sides:
        await side.stop()


async def drive(url: str, queues: list[str], calls: int) -> dict[str, list[int]]:
    """``calls`` round trips of each, alternating; each one's latencies in ns, in call order."""
    sides = [
        REGISTRY[kind].client(ClientOptions(url=url, queue=q, size=128, deadline=30.0))
        for kind, q in zip(KINDS, queues, strict=True)
    ]
    for side in sides:
        await side.start()
    try:
        for _ in range(WARMUP):
            for side in sides:
                await side.operate(0, True)
        got: dict[str, list[int]] = {kind: [] for kind in KINDS}
        clock = time.perf_counter_ns
        for i in range(calls):
            order = (0, 1) if i % 2 == 0 else (1, 0)  # A B, then B A: neither always goes first
            for n in order:
                started = clock()
                await sides[n].operate(0, False)
                got[KINDS[n]].append(clock() - started)
        return got
    finally:
        for side in sides:
            await side.stop()


def summary(got: dict[str, list[int]], blocks: int) -> dict[str, Any]:
    a, b = got["rpc"], got["raw-rpc"]
    size = len(a) // blocks
    per_block = [
        statistics.median(a[k * size : (k + 1) * size]) / statistics.median(b[k * size : (k + 1) * size])
        for k in range(blocks)
    ]
    return {
        "calls": len(a),
        "p50_us": {"rpc": statistics.median(a) / 1000, "raw-rpc": statistics.median(b) / 1000},
        "ratio_of_medians": statistics.median(a) / statistics.median(b),
        "ratio_per_block": per_block,
        "median_pair_ratio": statistics.median(x / y for x, y in zip(a, b, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000, help="round trips of each (default 20000)")
    parser.add_argument("--blocks", type=int, default=20, help="blocks the ratio is also shown for (default 20)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    url = broker_url()
    if args.serve:
        run_in_loop(lambda: serve(url, list(args.serve)), args.loop)
        return
    queues = [f"rpc-paired-{kind}-{uuid.uuid4().hex[:8]}" for kind in KINDS]
    with serving([sys.executable, __file__, "--loop", args.loop, "--serve", *queues], url, what="the serving process"):
        got: dict[str, list[int]] = run_in_loop(lambda: drive(url, queues, args.calls), args.loop)
    figures = summary(got, args.blocks)
    p50 = figures["p50_us"]
    blocks = sorted(figures["ratio_per_block"])
    print(f"{args.loop}, {figures['calls']} calls of each, one in flight, alternating")
    print(f"  p50 round trip: amqpkit rpc {p50['rpc']:.0f} us, bare aiormq raw-rpc {p50['raw-rpc']:.0f} us")
    print(f"  rpc / raw-rpc, ratio of medians: {figures['ratio_of_medians']:.3f}")
    print(f"  per block of {figures['calls'] // args.blocks}: median {statistics.median(blocks):.3f}, "
          f"range {blocks[0]:.3f}-{blocks[-1]:.3f}")  # fmt: skip
    print(f"  median of the per-pair ratios: {figures['median_pair_ratio']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"loop": args.loop, **figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
