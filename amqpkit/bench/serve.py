"""The serving side of a benchmark scenario, as its own process.

``python -m amqpkit.bench.serve SCENARIO --queue NAME`` starts the server or
consumer on the broker named by ``AMQP_URL`` (never an argument: a command
line is visible to every local user, and the URL holds the password), prints
``{"ready": true, "endpoint": "host:port", "instrumented": false}`` (the
endpoint for HTTP and gRPC servers; whether ``--otel`` instrumented it),
then answers commands read from stdin, one per line, each with one JSON
line on stdout:

- ``report N [TIMEOUT]``: waits until N measured messages arrived (one-way)
  and prints ``{"received", "errors", "last_ns", "hist", "distinct",
  "duplicates", "traced"}`` (``hist``: an encoded HDR histogram; ``distinct``:
  sequence numbers seen, for the ledger; ``traced``: messages that carried a
  ``traceparent``), and ``series`` (per second: count and
  histogram) after a ``reset`` with an origin;
- ``reset [ORIGIN_NS]``: forgets what was measured (between runs); with an
  origin (monotonic ns), counts per second from then on;
- ``quit``: stops and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from ..settings import BrokerSettings
from .loads import run_in_loop
from .otel import OTEL_MODES, set_up
from .scenarios import SERVERS, ServerOptions, ServerSide


async def serve(side: ServerSide) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await side.start()
    _say({"ready": True, "endpoint": side.endpoint, "instrumented": _instrumented()})
    try:
        while line := (await reader.readline()).decode().strip():
            command, *arguments = line.split()
            if command == "report":
                expected = int(arguments[0]) if arguments else 0
                timeout = float(arguments[1]) if len(arguments) > 1 else 60.0
                _say(await side.report(expected, timeout))
            elif command == "reset":
                side.reset(int(arguments[0]) if arguments else None)
                _say({"ok": True})
            elif command == "quit":
                break
            else:
                _say({"error": f"unknown command {command!r}"})
    finally:
        await side.stop()


def _instrumented() -> bool:
    """Whether amqpkit.telemetry.instrument() is in effect here (never imports OpenTelemetry to find out)."""
    telemetry = sys.modules.get("amqpkit.telemetry")
    return bool(telemetry is not None and telemetry.instrumented())


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
    parser.add_argument("--service-ms", type=float, default=0.0)
    parser.add_argument("--deadline", type=float, default=30.0)
    parser.add_argument("--task-cpu-ms", type=float, default=0.0, help="a work-queue task's CPU work, ms")
    parser.add_argument("--role", default="", help="a chain's service: b, c or d")
    parser.add_argument("--next", default="", help="host:port of the next service of an HTTP chain")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--otel", choices=OTEL_MODES, default=None, help="instrumented as amqpkit bench --otel")
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
        service_ms=args.service_ms,
        role=args.role,
        next_endpoint=args.next,
        deadline=args.deadline,
        task_cpu_ms=args.task_cpu_ms,
    )
    if args.otel is not None:
        set_up(args.otel)
    if args.progress_fd is not None:
        os.set_blocking(args.progress_fd, False)
    run_in_loop(lambda: serve(SERVERS[args.scenario](options)), args.loop)


if __name__ == "__main__":
    main()
