"""Drive the local RabbitMQ node for fault tests."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run rabbitmqctl against the local node (fault tests need a broker on this machine)."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("this test drives the broker with rabbitmqctl, which is not installed here", pytrace=False)
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


async def arabbitmqctl(*args: str, timeout: float = 60) -> str:
    return await asyncio.to_thread(rabbitmqctl, *args, timeout=timeout)
