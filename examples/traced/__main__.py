"""``python -m examples.traced [--png FILE]``: run the flow once, print its spans, draw the trace."""

from __future__ import annotations

import argparse
import asyncio
import os

from amqpkit.logs import configure_logging

from . import run_once
from .draw import describe, draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--png", default="patterns/observability-trace.png", help="where to draw the trace")
    args = parser.parse_args()
    configure_logging(json_lines=True)  # each line inside a span carries trace_id and span_id
    spans = asyncio.run(run_once(os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")))
    print(describe(spans))
    draw(spans, args.png)
    print(f"drew {len(spans)} spans of {len({s.context.trace_id for s in spans})} trace(s) to {args.png}")


if __name__ == "__main__":
    main()
