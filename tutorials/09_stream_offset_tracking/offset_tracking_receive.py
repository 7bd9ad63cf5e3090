#!/usr/bin/env python
"""Streams tutorial 2, offset tracking: read 'stream-offset-tracking' up to its marker, remembering the offset.

The offset of the last message handled is stored in a file; started again
without --start, the consumer resumes right after it. --start asks for a
place instead: first, last, next, an offset (a number) or a point in time
(an ISO 8601 timestamp).
"""

import argparse
import asyncio
import contextlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from amqpkit import Broker, BrokerSettings, Delivery, Queue, QueueType
from amqpkit.runner import run_until_signal

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_OFFSET_FILE = "stream-offset-tracking.offset"

STREAM = Queue("stream-offset-tracking", type=QueueType.STREAM, max_length_bytes=2_000_000_000)
STORE_EVERY = 10  # messages between two writes of the offset file


def read_offset(path: Path) -> int | None:
    """The offset stored by an earlier run, if there is one."""
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def store_offset(path: Path, offset: int) -> None:
    """Write the offset to a new file, then put it in place: a crash leaves the old value or the new one."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(f"{offset}\n")
    os.replace(partial, path)


def offset_spec(start: str | None, stored: int | None) -> tuple[str | int | datetime, str]:
    """The x-stream-offset value to attach with, and how to say it."""
    if start is None:
        if stored is None:
            return "first", "no stored offset: from 'first'"
        return stored + 1, f"stored offset {stored}: from offset {stored + 1}"
    if start in ("first", "last", "next"):
        return start, f"from {start!r}"
    if start.isdigit():
        return int(start), f"from offset {start}"
    moment = datetime.fromisoformat(start)  # 2026-11-28T08:00:00Z; without a zone, UTC
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return moment, f"from {moment.isoformat()}"


@dataclass
class Progress:
    first: int | None = None
    last: int | None = None
    count: int = 0
    marker: bool = False


async def main(url: str, start: str | None, offset_file: Path, stop: asyncio.Event) -> int:
    stored = read_offset(offset_file)
    spec, described = offset_spec(start, stored)
    # A numeric offset is where the consumer starts, but the broker sends whole chunks (a chunk holds
    # one or more messages): messages before the offset asked for may come first, and are skipped.
    skip_below = spec if isinstance(spec, int) else None
    progress = Progress()
    arrived: asyncio.Queue[Delivery[bytes]] = asyncio.Queue()

    async def take(message: Delivery[bytes]) -> None:
        await arrived.put(message)  # handled one by one, in the stream's order, by handle() below

    async def handle() -> None:
        while not progress.marker:
            message = await arrived.get()
            offset = int(message.headers["x-stream-offset"])
            if skip_below is None or offset >= skip_below:
                if progress.first is None:
                    progress.first = offset
                    print(f" [x] First message received: offset {offset}")
                progress.last, progress.count = offset, progress.count + 1
                if message.body == b"marker":
                    progress.marker = True
                    print(f" [x] Marker found at offset {offset}")
                if progress.marker or progress.count % STORE_EVERY == 0:
                    store_offset(offset_file, offset)
            await message.ack()  # the prefetch's credit back; the message stays in the stream

    async with Broker(BrokerSettings(url=url)) as broker:
        await broker.declare_queue(STREAM)
        # Streams need a prefetch and manual acks; x-stream-offset says where to start reading.
        consumer = await broker.consume(STREAM, take, prefetch=100, arguments={"x-stream-offset": spec})
        print(f" [*] Reading {STREAM.name}, {described}. To exit press CTRL+C")
        handling = asyncio.ensure_future(handle())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({handling, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (handling, stopping):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await consumer.cancel()
    if progress.last is not None:
        store_offset(offset_file, progress.last)
    if progress.marker:
        print(f" [x] Done: {progress.count} messages, offsets {progress.first} to {progress.last}; "
              f"offset {progress.last} stored")  # fmt: skip
    else:
        if progress.last is not None:
            print(f" [x] Offset {progress.last} stored")
        print("Interrupted")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL (default: AMQP_URL)")
    parser.add_argument("--start", help="first | last | next | OFFSET | TIMESTAMP (default: after the stored offset)")
    parser.add_argument("--offset-file", type=Path, default=Path(DEFAULT_OFFSET_FILE),
                        help=f"where the offset is kept (default: {DEFAULT_OFFSET_FILE})")  # fmt: skip
    args = parser.parse_args()
    try:
        offset_spec(args.start, None)
    except ValueError:
        parser.error(f"--start {args.start!r}: not first, last, next, an offset or an ISO 8601 timestamp")
    raise SystemExit(run_until_signal(lambda stop: main(args.url, args.start, args.offset_file, stop)))
