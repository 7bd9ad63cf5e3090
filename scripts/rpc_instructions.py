"""Instructions per RPC call on each side, amqpkit's RPC against bare aiormq's, counted by valgrind.

    .venv/bin/python scripts/rpc_instructions.py [--calls 200 1200] [--out FILE]

The broker is ``AMQP_URL`` (default: guest on 127.0.0.1:5672), handed to the other processes through
their environment, never on a command line.

Latency at one call in flight swings by a third from one run to the next on a small shared machine
(where the client, the server and the broker land on its cores decides more than the code does).
Instructions executed do not: callgrind counts them the same, whatever else runs. Each side (the
caller, the serving process) is run under ``valgrind --tool=callgrind`` in turn, the other side
running normally, for two numbers of sequential calls; the difference of the two totals divided
by the difference of the call counts is that side's instructions per call, start-up excluded.

The scenarios are the bench's own ``rpc`` (RpcClient.call over direct reply-to to an echoing
RpcServer, bytes in and out) and ``raw-rpc`` (the same over bare aiormq), 128-byte bodies.
Needs valgrind (Debian: ``apt-get install valgrind``); about 4 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from serving import URL_ENV, broker_url, serving

from amqpkit.bench.base import ClientOptions, ServerOptions
from amqpkit.bench.scenarios import REGISTRY

# The bench's own scenarios, serving and driving sides as it runs them.
KINDS: dict[str, tuple[Any, Any]] = {n: (REGISTRY[n].server, REGISTRY[n].client) for n in ("rpc", "raw-rpc")}


async def serve(kind: str, url: str, queue: str) -> None:
    """The serving side until a line arrives on stdin."""
    side = KINDS[kind][0](ServerOptions(url=url, queue=queue))
    await side.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await side.stop()


async def drive(kind: str, url: str, queue: str, calls: int) -> None:
    """``calls`` sequential calls (the deadline is long: under valgrind each side runs ~50x slower)."""
    side = KINDS[kind][1](ClientOptions(url=url, queue=queue, size=128, deadline=600.0))
    await side.start()
    for _ in range(calls):
        await side.operate(0, False)
    await side.stop()


def instructions(side: str, kind: str, url: str, calls: int, workdir: Path) -> int:
    """Total instructions of the ``side`` process over a run of ``calls`` calls."""
    out = workdir / f"{side}-{kind}-{calls}.out"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    me = [sys.executable, __file__]
    queue = f"rpc-instructions-{uuid.uuid4().hex[:8]}"
    server_cmd = (valgrind if side == "server" else []) + [*me, "--serve", kind, queue]
    with serving(server_cmd, url, what=f"the {kind} serving side", quiet=True):
        drive_cmd = [*me, "--drive", kind, queue, str(calls)]
        env = {**os.environ, URL_ENV: url}
        if side == "client":
            silent = subprocess.DEVNULL
            subprocess.run([*valgrind, *drive_cmd], check=True, env=env, stdout=silent, stderr=silent)
        else:
            subprocess.run(drive_cmd, check=True, env=env)
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise SystemExit(f"no summary line in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, nargs=2, default=[200, 1200], metavar=("FEW", "MANY"))
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--drive", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    url = broker_url()
    if args.serve:
        asyncio.run(serve(args.serve[0], url, args.serve[1]))
        return
    if args.drive:
        asyncio.run(drive(args.drive[0], url, args.drive[1], int(args.drive[2])))
        return
    few, many = args.calls
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="rpc-instructions-") as d:
        for side in ("client", "server"):
            for kind in KINDS:
                low = instructions(side, kind, url, few, Path(d))
                high = instructions(side, kind, url, many, Path(d))
                per_call = (high - low) / (many - few)
                figures.setdefault(side, {})[kind] = per_call
                print(f"{side:6s} {kind:8s} {per_call / 1000:8.1f} k instructions per call", flush=True)
    for side, by_kind in figures.items():
        print(f"{side}: rpc / raw-rpc = {by_kind['rpc'] / by_kind['raw-rpc']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"calls": [few, many], "per_call": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
