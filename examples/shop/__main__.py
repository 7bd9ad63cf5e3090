"""``python -m examples.shop COMMAND``: the shop from the command line.

- ``all`` (or ``up``) ``[--port 8080] [--data DIR] [--log-json]``: every service (products
  twice), and the gateway, on the broker of ``AMQP_URL``; Ctrl-C ends them all;
- ``gateway [--port 8080]``: the gateway alone;
- ``products``, ``reviews``, ``cart``, ``orders``, ``invoices``,
  ``notifications``, ``history``: one service alone (as ``amqpkit run
  examples.shop.NAME:service`` does);
- ``rebuild`` (or ``history --rebuild``): the read model again from the event log (stop ``history`` first);
- ``trace ORDER_ID``: the trace of an order, from the spans in ``SHOP_TRACES``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .launcher import SERVICES, running


def up(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.shop all", description="run the whole shop")
    parser.add_argument("--port", type=int, default=8080, help="the gateway's port")
    parser.add_argument("--data", help="folder of the SQLite files (default: SHOP_DATA, else a temporary folder)")
    parser.add_argument("--products", type=int, default=2, help="how many products processes share their queue")
    parser.add_argument("--log-json", action="store_true", help="every process logs JSON lines, with trace ids")
    args = parser.parse_args(argv)
    env = {"SHOP_DATA": args.data} if args.data else {}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with running(env, gateway_port=args.port, products=args.products, timeout=120, log_json=args.log_json) as shop:
        print(f"shop ready on {shop.gateway_url} ({len(shop.procs)} processes); Ctrl-C stops them all", flush=True)
        while not stop.wait(0.5):
            gone = [name for name, proc in shop.procs.items() if proc.popen.poll() is not None]
            if gone:
                print(f"{', '.join(gone)} exited; stopping the others", file=sys.stderr, flush=True)
                return 1
        print("stopping every process", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("all", "up"):
        return up(rest)
    if command == "gateway":
        from .gateway import main as gateway_main

        return gateway_main(rest)
    if command == "history" and "--rebuild" in rest:
        command = "rebuild"
    if command in SERVICES:
        cmd = [sys.executable, "-m", "amqpkit.cli", "run", f"examples.shop.{command}:service", *rest]
        return subprocess.call(cmd, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    if command == "rebuild":
        from .history import rebuild_main

        return asyncio.run(rebuild_main())
    if command == "trace":
        from .draw import main as trace_main

        return trace_main(rest)
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
