"""``python -m amqpkit.outbox relay --db URL``: run an outbox relay as a process of its own."""

from __future__ import annotations

import argparse
import sys

from .relay import main as relay_main


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amqpkit.outbox", description="Transactional outbox tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    relay = commands.add_parser("relay", help="publish committed outbox rows until SIGTERM or Ctrl-C")
    relay.add_argument("--db", help="database URL (default: AMQPKIT_OUTBOX_DB); sqlite:///file.db or postgresql://...")
    relay.add_argument("--url", help="AMQP URL (default: AMQP_URL, else the local broker)")
    relay.add_argument("--prefix", help="table name prefix (default amqpkit_)")
    relay.add_argument("--schema", help="PostgreSQL schema of the tables")
    relay.add_argument("--batch-size", type=int, help="rows per round (default 200)")
    relay.add_argument("--poll-interval", type=float, help="seconds between looks when idle (default 1)")
    relay.add_argument("--retention", type=float, help="seconds sent rows are kept (default 86400)")
    args = parser.parse_args(argv)
    return relay_main(
        args.db,
        args.url,
        prefix=args.prefix,
        schema=args.schema,
        batch_size=args.batch_size,
        poll_interval=args.poll_interval,
        retention=args.retention,
    )


if __name__ == "__main__":
    sys.exit(cli())
