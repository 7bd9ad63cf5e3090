"""The serving side of a benchmark scenario, as its own process.

``python -m amqpkit.bench.serve SCENARIO --queue NAME`` starts the server or
consumer on the broker named by ``AMQP_URL`` (never an argument: a command
line is visible to every local user, and the URL holds the password), prints
``{"ready": true}``, then answers commands read from stdin, one per line, each
with one JSON line on stdout:

- ``report N``: waits until N measured messages arrived (one-way) and prints
  ``{"received", "errors", "last_ns", "hist"}`` (``hist``: an encoded HDR histogram);
- ``reset``: forgets what was measured (between runs of a sweep);
- ``quit``: stops and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from ..settings import BrokerSettings
from .scenarios import SERVERS, ServerOptions, ServerSide


async def serve(side: ServerSide) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await side.start()
    _say({"ready": True})
    try:
        while line := (await reader.readline()).decode().strip():
            command, _, argument = line.partition(" ")
            if command == "report":
                _say(await side.report(int(argument or 0)))
            elif command == "reset":
                side.reset()
                _say({"ok": True})
            elif command == "quit":
                break
            else:
                _say({"error": f"unknown command {command!r}"})
    finally:
        await side.stop()


def _say(doc: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m amqpkit.bench.serve", description=__doc__)
    parser.add_argument("scenario", choices=sorted(SERVERS))
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--queue-type", default="classic")
    parser.add_argument("--stall-ms", type=int, default=0)
    parser.add_argument("--stall-after", type=int, default=0)
    parser.add_argument("--progress-fd", type=int, default=None, help="write one byte here per handled message")
    args = parser.parse_args()
    options = ServerOptions(
        url=BrokerSettings.from_env().urls[0],
        queue=args.queue,
        prefetch=args.prefetch,
        queue_type=args.queue_type,
        stall_ms=args.stall_ms,
        stall_after=args.stall_after,
        progress_fd=args.progress_fd,
    )
    if args.progress_fd is not None:
        os.set_blocking(args.progress_fd, False)
    asyncio.run(serve(SERVERS[args.scenario](options)))


if __name__ == "__main__":
    main()
