"""The relay process stopped (SIGTERM) while it waits for a broker that does not answer yet."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import processes
from ..brokerctl import free_port


async def test_sigterm_stops_a_relay_that_waits_for_the_broker_at_start(spawned: None, tmp_path: Path) -> None:
    """The relay waits about a minute and a half for a broker that is not up yet (20 connect attempts); a SIGTERM
    meanwhile (a deploy, a rollback, a pod evicted during the outage) should end it within a few seconds, exit 0:
    nothing was claimed, every row stays pending. Before: the SIGTERM only set an event nobody looked at until
    the connect gave up: the process ran on 61 s after it, then exited 2 with "cannot connect to RabbitMQ after 20
    attempts" (an orchestrator SIGKILLs it first, at 30 s by default)."""
    env = {**os.environ, "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}
    proc = await processes.spawn(
        sys.executable, "-m", "amqpkit.outbox", "relay", "--db", f"sqlite:///{tmp_path / 'app.db'}",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.sleep(3)
        assert proc.returncode is None
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 20)
        except TimeoutError:
            raise AssertionError(f"still running {time.monotonic() - began:.0f} s after SIGTERM") from None
        text = err.decode()
        assert proc.returncode == 0, f"exit {proc.returncode} {time.monotonic() - began:.0f} s after SIGTERM: {text}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
