"""`amqpkit worker` logs one line per event: a connection cut is one "lost" line and one "reconnected" line.

The worker runs as a subprocess and reaches the broker through the fault proxy,
which cuts only that worker's connection. aiormq's own records (warnings with
tracebacks) stay out of the output unless ``--verbose`` asks for them; with
``--log-json`` every line is one JSON object, tracebacks included.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from amqpkit import Broker
from amqpkit.logs import configure_logging

from . import processes
from .reliability.proxy import FaultProxy, proxied_url

pytestmark = pytest.mark.usefixtures("spawned")  # every process a test starts is ended, whatever the outcome

ROOT = Path(__file__).resolve().parents[1]


class CliProcess:
    """An ``amqpkit`` subprocess whose stdout is read line by line.

    Started with ``processes.spawn``: the ``spawned`` fixture ends it (and what it started) after the test.
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.err_lines: list[str] = []

    @classmethod
    async def start(cls, *args: str, env: dict[str, str]) -> CliProcess:
        proc = await processes.spawn(
            sys.executable, "-m", "amqpkit.cli", *args, cwd=ROOT, env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(proc)

    async def until(self, predicate: Callable[[str], bool], timeout: float = 30, *, stderr: bool = False) -> str:
        """Read stdout (or stderr) until a line satisfies ``predicate``; that line.

        AssertionError on EOF or past ``timeout``.
        """
        stream, lines = (self.proc.stderr, self.err_lines) if stderr else (self.proc.stdout, self.lines)
        assert stream is not None
        try:
            async with asyncio.timeout(timeout):
                while line := (await stream.readline()).decode():
                    lines.append(line.rstrip("\n"))
                    if predicate(line):
                        return line
        except TimeoutError:
            pass
        raise AssertionError("expected line not seen; output so far:\n" + "\n".join(self.lines + self.err_lines))

    async def wait_exit(self, timeout: float) -> tuple[int, str]:
        """Wait for the process to exit by itself; (exit code, stderr). AssertionError past ``timeout``."""
        try:
            out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        except TimeoutError:
            raise AssertionError(f"still running after {timeout:g} s; output so far:\n" + "\n".join(
                self.lines + self.err_lines)) from None  # fmt: skip
        return self._finished(out, err)

    async def end(self, timeout: float = 30) -> tuple[int, str]:
        """SIGTERM (then SIGKILL past ``timeout``); reads the rest of the output. (exit code, stderr)."""
        if self.proc.returncode is not None and self.proc.stdout is not None and self.proc.stdout.at_eof():
            return self.proc.returncode, "\n".join(self.err_lines)
        if self.proc.returncode is None:
            self.proc.terminate()
        try:
            out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        except TimeoutError:
            self.proc.kill()
            out, err = await self.proc.communicate()
        return self._finished(out, err)

    def _finished(self, out: bytes, err: bytes) -> tuple[int, str]:
        self.lines += out.decode().splitlines()
        self.err_lines += err.decode().splitlines()
        assert self.proc.returncode is not None
        return self.proc.returncode, "\n".join(self.err_lines)


async def cut_worker_once(proxy: FaultProxy, amqp_url: str, queue: str, *flags: str) -> tuple[list[str], list[str]]:
    """Run a worker through ``proxy``, cut its connection once; the stdout lines before and after the cut."""
    worker = await CliProcess.start(
        "worker", "tests.worker_app:handle", "--queue", queue, *flags, env={"AMQP_URL": proxied_url(proxy, amqp_url)}
    )
    try:
        await worker.until(lambda line: line.startswith("worker on"), stderr=True)  # consuming now
        before = len(worker.lines)
        assert proxy.connections >= 1
        proxy.cut()
        await worker.until(lambda line: "reconnected" in line)
        code, err = await worker.end()
        assert code == 0, err
    finally:
        if worker.proc.returncode is None:
            await worker.end(timeout=5)
    return worker.lines[:before], worker.lines[before:]


def about(lines: list[str], word: str) -> list[str]:
    return [line for line in lines if word in line]


@pytest.fixture
async def queue(broker: Broker, name: str) -> AsyncIterator[str]:
    try:
        yield name
    finally:
        await broker.delete_queue(name)
        await broker.delete_queue(f"{name}.dlq")


async def test_a_cut_is_one_line_lost_and_one_line_reconnected(proxy: FaultProxy, amqp_url: str, queue: str) -> None:
    _, after = await cut_worker_once(proxy, amqp_url, queue)
    shown = "\n".join(after)
    assert not about(after, "aiormq"), shown
    assert not about(after, "Traceback"), shown
    assert len(about(after, "lost")) == 1, shown
    assert len(about(after, "reconnected")) == 1, shown
    assert "guest:***@" in about(after, "lost")[0]


async def test_log_json_is_one_object_per_line(proxy: FaultProxy, amqp_url: str, queue: str) -> None:
    before, after = await cut_worker_once(proxy, amqp_url, queue, "--log-json")
    records = [json.loads(line) for line in before + after]  # every line parses
    assert all(isinstance(r, dict) and {"time", "level", "logger", "message"} <= r.keys() for r in records)
    loggers = [r["logger"] for r in records[len(before) :]]
    assert not [name for name in loggers if name.startswith(("aiormq", "aio_pika"))], loggers
    messages = [r["message"] for r in records[len(before) :]]
    assert len(about(messages, "lost")) == 1, messages
    assert len(about(messages, "reconnected")) == 1, messages


async def test_verbose_shows_aiormq_and_stays_one_object_per_line(proxy: FaultProxy, amqp_url: str, queue: str) -> None:
    before, after = await cut_worker_once(proxy, amqp_url, queue, "--log-json", "--verbose")
    records = [json.loads(line) for line in before + after]
    assert any(r["logger"].startswith("aiormq") for r in records)


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, given back afterwards with the handlers and level it had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_json_keeps_the_traceback_in_one_line(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging(json_lines=True, stream=stream)
    try:
        raise ValueError("bad\nsecond line")
    except ValueError:
        logging.getLogger("amqpkit.test").exception("it failed\nhere")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["message"] == "it failed\nhere"
    assert record["error"] == "ValueError: bad\nsecond line"
    assert record["traceback"].startswith("Traceback (most recent call last):\n")
    assert "raise ValueError" in record["traceback"]


def test_plain_and_json_leave_out_aiormq_and_aio_pika_below_critical(root_logger: logging.Logger) -> None:
    for json_lines in (False, True):
        stream = io.StringIO()
        configure_logging(json_lines=json_lines, stream=stream)
        logging.getLogger("aiormq.connection").warning("noise")
        logging.getLogger("aio_pika.robust_connection").error("noise")
        logging.getLogger("amqpkit.broker").warning("signal")
        assert "noise" not in stream.getvalue()
        assert "signal" in stream.getvalue()


def test_verbose_lets_aiormq_through_at_debug(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging(stream=stream, verbose=True)
    logging.getLogger("aiormq.connection").debug("frame")
    assert "frame" in stream.getvalue()
