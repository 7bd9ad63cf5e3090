"""The stream tutorials (8 and 9) as subprocesses: exact output, clean exits, offsets stored and resumed.

Each test runs on the plugin's per-test vhost, and the streams are deleted
before and after it (a stream keeps its messages, so one left from an
earlier run would shift every offset).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from amqpkit import Broker

from .tutorial_support import Script, run

pytestmark = pytest.mark.usefixtures("spawned")

HELLO = "08_streams_hello_world"
TRACKING = "09_stream_offset_tracking"
SEND = f"{TRACKING}/offset_tracking_send.py"
RECEIVE = f"{TRACKING}/offset_tracking_receive.py"
WAITING_MESSAGES = " [*] Waiting for messages. To exit press CTRL+C"


@pytest.fixture
async def streams(broker: Broker) -> AsyncIterator[None]:
    """No tutorial stream before the test, none after it."""

    async def delete() -> None:
        for name in ("hello-stream", "stream-offset-tracking"):
            with contextlib.suppress(Exception):
                await broker.delete_queue(name)

    await delete()
    yield
    await delete()


async def assert_clean_exit(script: Script, sig: int = signal.SIGTERM) -> None:
    code, out, err = await script.stop(sig)
    assert (code, out) == (0, "Interrupted\n"), err
    assert "Traceback" not in err


def reading(described: str) -> str:
    return f" [*] Reading stream-offset-tracking, {described}. To exit press CTRL+C"


async def receive(offset_file: Path, *start: str, url: str) -> list[str]:
    """Run the offset-tracking consumer to its marker; its lines."""
    code, out, err = await run(RECEIVE, "--offset-file", str(offset_file), *start, url=url, timeout=15)
    assert code == 0 and "Traceback" not in err, err
    return out.splitlines()


def done(first: int, last: int) -> list[str]:
    return [
        f" [x] First message received: offset {first}",
        f" [x] Marker found at offset {last}",
        f" [x] Done: {last - first + 1} messages, offsets {first} to {last}; offset {last} stored",
    ]


async def send(count: int, url: str) -> None:
    sent = f" [x] Sent {count} messages, the last one the marker\n"
    assert await run(SEND, "--count", str(count), url=url) == (0, sent, "")


@pytest.mark.parametrize(
    "script",
    [f"{HELLO}/send.py", f"{HELLO}/receive.py", SEND, RECEIVE],
)
async def test_help(script: str, amqp_url: str) -> None:
    code, out, err = await run(script, "--help", url=amqp_url)
    assert code == 0, err
    assert out.startswith("usage:") and "--url" in out


@pytest.mark.usefixtures("streams")
async def test_hello_stream_is_read_from_the_first_offset_by_every_reader(amqp_url: str) -> None:
    assert await run(f"{HELLO}/send.py", url=amqp_url) == (0, " [x] Sent 'Hello, World!'\n", "")
    assert await run(f"{HELLO}/send.py", "second", url=amqp_url) == (0, " [x] Sent 'second'\n", "")
    readers = []
    for _ in range(2):  # the second reader gets the same messages: reading takes nothing away
        reader = await Script.start(f"{HELLO}/receive.py", url=amqp_url)
        assert await reader.line() == WAITING_MESSAGES
        assert await reader.line() == " [x] Received b'Hello, World!' (offset 0)"
        assert await reader.line() == " [x] Received b'second' (offset 1)"
        readers.append(reader)
    assert await run(f"{HELLO}/send.py", "third", url=amqp_url) == (0, " [x] Sent 'third'\n", "")
    for reader in readers:
        assert await reader.line() == " [x] Received b'third' (offset 2)"
    await assert_clean_exit(readers[0], signal.SIGINT)
    await assert_clean_exit(readers[1])


@pytest.mark.usefixtures("streams")
async def test_the_consumer_resumes_after_the_offset_it_stored(amqp_url: str, tmp_path: Path) -> None:
    offset_file = tmp_path / "offset"
    await send(100, amqp_url)
    assert await receive(offset_file, url=amqp_url) == [reading("no stored offset: from 'first'"), *done(0, 99)]
    assert offset_file.read_text() == "99\n"
    await send(100, amqp_url)  # offsets 100 to 199
    assert await receive(offset_file, url=amqp_url) == [reading("stored offset 99: from offset 100"), *done(100, 199)]
    assert offset_file.read_text() == "199\n"
    # 'first' again: the whole stream is still there, and the first marker (99) ends the reading.
    assert await receive(offset_file, "--start", "first", url=amqp_url) == [reading("from 'first'"), *done(0, 99)]


@pytest.mark.usefixtures("streams")
async def test_a_numeric_offset_and_next(amqp_url: str, tmp_path: Path) -> None:
    offset_file = tmp_path / "offset"
    await send(100, amqp_url)
    # From offset 42: the messages before it in its chunk are skipped, so the reading starts exactly there.
    assert await receive(offset_file, "--start", "42", url=amqp_url) == [reading("from offset 42"), *done(42, 99)]
    # 'next': only what comes after the consumer attached.
    waiting = await Script.start(RECEIVE, "--offset-file", str(offset_file), "--start", "next", url=amqp_url)
    assert await waiting.line() == reading("from 'next'")
    await send(10, amqp_url)  # offsets 100 to 109
    out, err = await asyncio.wait_for(waiting.proc.communicate(), 15)  # it ends at the marker
    assert (waiting.proc.returncode, out.decode().splitlines()) == (0, done(100, 109)), err.decode()
    assert offset_file.read_text() == "109\n"
    # Nothing new to read: stopped, it stores nothing and says it was interrupted.
    idle = await Script.start(RECEIVE, "--offset-file", str(offset_file), "--start", "next", url=amqp_url)
    assert await idle.line() == reading("from 'next'")
    await assert_clean_exit(idle)
    assert offset_file.read_text() == "109\n"


@pytest.mark.usefixtures("streams")
async def test_a_timestamp(amqp_url: str, tmp_path: Path) -> None:
    await send(20, amqp_url)  # offsets 0 to 19, written before `moment`
    moment = int(time.time()) + 1  # the next whole second: an AMQP timestamp counts whole seconds
    await asyncio.sleep(moment - time.time() + 0.1)
    await send(20, amqp_url)  # offsets 20 to 39, written after it
    at = datetime.fromtimestamp(moment, UTC).isoformat()
    assert await receive(tmp_path / "offset", "--start", at, url=amqp_url) == [reading(f"from {at}"), *done(20, 39)]


async def test_a_start_that_is_no_offset_spec(amqp_url: str) -> None:
    code, out, err = await run(RECEIVE, "--start", "yesterday", url=amqp_url)
    assert (code, out) == (2, "")
    assert "--start 'yesterday': not first, last, next, an offset or an ISO 8601 timestamp" in err
