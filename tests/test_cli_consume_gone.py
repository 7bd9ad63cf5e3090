"""`amqpkit consume --queue Q` whose queue someone else deletes: the command stays, consuming nothing, for ever.

Found by a hunt. ``consume`` reads someone else's queue with ``declare=False``; deleted under it, the broker
cancels the consumer, the re-attach meets 404 and the consumer is stopped for good (one ERROR line), but the
command waits on for its ``--count`` or ``--timeout`` (none by default: until Ctrl-C), then exits 0. ``amqpkit
run`` and ``amqpkit worker`` exit 1 with the reason in the same case. Measured on 3.10.8 and 4.0.5: still
running 10 s after the delete (the test gives it 10 s; a whole `timeout 25` by hand, exit 124).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from amqpkit import Broker, Envelope, Queue

from . import processes
from .waiting import until

pytestmark = pytest.mark.usefixtures("spawned")  # the CLI process ends with its test


async def test_consume_ends_when_its_queue_is_deleted(broker: Broker, amqp_url: str, name: str) -> None:
    await broker.declare_queue(Queue(name, durable=True))
    try:
        proc = await processes.spawn(
            sys.executable, "-m", "amqpkit.cli", "consume", "--queue", name,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "AMQP_URL": amqp_url},
        )  # fmt: skip
        assert proc.stderr is not None
        assert b"consuming from" in await asyncio.wait_for(proc.stderr.readline(), 30)
        await broker.delete_queue(name)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            pytest.fail("amqpkit consume still runs 10 s after its queue was deleted")
        assert proc.returncode != 0
    finally:
        await broker.delete_queue(name)


async def test_consume_count_deleted_under_it_ends_with_its_error(broker: Broker, amqp_url: str, name: str) -> None:
    """With --count, the messages shown are held unacked until the count is reached; deleted under it, those acks
    met a closed channel: a traceback, not the consumer's error (a review, 2 December)."""
    await broker.declare_queue(Queue(name, durable=True))
    try:
        proc = await _three_shown_of_ten(broker, amqp_url, name)
        await broker.delete_queue(name)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        text = err.decode()
        assert proc.returncode == 1, text
        assert "Traceback" not in text, text
        assert "3 message(s)" in text and "error: the consumer stopped" in text, text
    finally:
        await broker.delete_queue(name)


# Loaded by the CLI process at its start (a sitecustomize on its PYTHONPATH): the consumer's attach ends 3 s later,
# so the messages are shown while consume() has not returned yet, as on a loaded machine.
SLOW_ATTACH = """
import asyncio
import amqpkit.consuming as consuming

attach_now = consuming.Consuming._attach_now

async def slow(self, consumer):
    await attach_now(self, consumer)
    await asyncio.sleep(3)

consuming.Consuming._attach_now = slow
"""


@pytest.mark.parametrize("slow_attach", [False, True], ids=["started", "starting"])
async def test_consume_count_stopped_with_ctrl_c_keeps_what_it_showed(
    broker: Broker, amqp_url: str, name: str, tmp_path: Path, slow_attach: bool
) -> None:
    """Ctrl-C before the count: the messages shown were held unacked, and went back to the queue, redelivered (a
    review, 2 December). They are acked as the command stops. ``starting``: shown before consume() returned, when
    the Ctrl-C stopped consume() itself, which closed the consumer's channel and handed them back (once in 12 runs
    here; 3 of 4 with the attach slowed down)."""
    env: dict[str, str] = {}
    if slow_attach:
        (tmp_path / "sitecustomize.py").write_text(SLOW_ATTACH)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    await broker.declare_queue(Queue(name, type="quorum"))
    try:
        proc = await _three_shown_of_ten(broker, amqp_url, name, env)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err.decode()
        # a quorum queue's count follows its acks a moment later; handed back, the three would stay ready
        await until(lambda: _empty(broker, name), timeout=10)
    finally:
        await broker.delete_queue(name)


async def _empty(broker: Broker, name: str) -> bool:
    return (await broker.queue_counts(name))[0] == 0


async def _three_shown_of_ten(
    broker: Broker, amqp_url: str, name: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """``consume --count 10`` of queue ``name``, once it has shown the 3 messages published to it."""
    for i in range(3):
        await broker.publish(Envelope(str(i).encode()), routing_key=name)
    proc = await processes.spawn(
        sys.executable, "-m", "amqpkit.cli", "consume", "--queue", name, "--count", "10",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "AMQP_URL": amqp_url, "COLUMNS": "200", **(env or {})},
        preexec_fn=_ctrl_c_as_at_a_terminal,
    )  # fmt: skip
    assert proc.stdout is not None
    for _ in range(3):
        await asyncio.wait_for(proc.stdout.readline(), 30)
    return proc


def _ctrl_c_as_at_a_terminal() -> None:
    """In the child before its exec: SIGINT back to its default. A shell without job control (CI's runs its parts
    in the background) starts its background commands with SIGINT ignored, the child inherits that, and Python
    then never turns a SIGINT into KeyboardInterrupt: the Ctrl-C tests waited for an exit that never came."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
