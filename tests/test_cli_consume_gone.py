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
import sys

import pytest

from amqpkit import Broker, Queue

from . import processes

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
