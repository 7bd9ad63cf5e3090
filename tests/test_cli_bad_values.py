"""A value a command cannot run with is a usage error (exit 2) naming the option, before anything runs.

Before: ``publish --count -1`` said "published -1 message(s)"; ``call --timeout 0`` and ``bench --prefetch
70000`` printed a traceback (a ValueError from the library, after connecting); ``worker --max-attempts 0`` and
``--retry-delay -1`` printed pydantic's ValidationError as a traceback; ``run --metrics-port -1`` said
"Servname not supported for ai_socktype" and ``--health-port 70000`` "OverflowError" as a failed start;
``worker --grace -1``, ``run --grace -1`` and ``consume --timeout -1`` and ``outbox relay --poll-interval 0``
(a busy loop on the database while idle) ran; ``dlq list --limit -1`` listed nothing, as if the DLQ were empty.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from . import processes

pytestmark = pytest.mark.usefixtures("spawned")

WORKER = ["worker", "tests.worker_app:handle", "-q", "cli-bad-values"]
RUN = ["run", "tests.service.apps:workers"]
RELAY = ["outbox", "relay", "--db", "sqlite:///:memory:"]


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["publish", "x", "-k", "cli-bad-values", "--count", "-1"], "--count"),  # said "published -1 message(s)"
        (["publish", "x", "-k", "cli-bad-values", "--count", "0"], "--count"),
        (["call", "cli-bad-values", "m", "--timeout", "0"], "--timeout"),
        (["call", "cli-bad-values", "m", "--timeout", "-1"], "--timeout"),
        (["consume", "-q", "cli-bad-values", "--timeout", "-1"], "--timeout"),
        ([*WORKER, "--max-attempts", "0"], "--max-attempts"),
        ([*WORKER, "--retry-delay", "0"], "--retry-delay"),
        ([*WORKER, "--retry-delay", "-1"], "--retry-delay"),
        ([*WORKER, "--grace", "-1"], "--grace"),
        ([*RUN, "--grace", "-1"], "--grace"),
        ([*RUN, "--health-port", "70000"], "--health-port"),
        ([*RUN, "--metrics-port", "-1"], "--metrics-port"),
        ([*RUN, "--give-up-after", "0"], "--give-up-after"),
        (["bench", "-s", "rpc", "-n", "10", "--prefetch", "70000"], "prefetch"),
        ([*RELAY, "--poll-interval", "0"], "--poll-interval"),
        ([*RELAY, "--retention", "-1"], "--retention"),
        ([*RELAY, "--batch-size", "0"], "--batch-size"),
        (["consume", "-q", "cli-bad-values", "--timeout", "nan"], "--timeout"),  # typer's range refuses nan too
        ([*WORKER, "--grace", "nan"], "--grace"),
        ([*RUN, "--grace", "nan"], "--grace"),
        ([*RELAY, "--retention", "nan"], "--retention"),
        (["dlq", "list", "cli-bad-values", "--limit", "-1"], "--limit"),
        (["dlq", "replay", "cli-bad-values", "--limit", "-1"], "--limit"),
    ],
)
async def test_a_value_out_of_range_is_a_usage_error(amqp_url: str, args: list[str], option: str) -> None:
    proc = await processes.spawn(
        sys.executable, "-m", "amqpkit.cli", *args, "--url", amqp_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 2, (proc.returncode, out.decode()[-1000:], text[-2000:])
    assert "Traceback" not in text
    assert option in text, text[-2000:]


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        (["--poll-interval", "0"], "poll_interval"),
        (["--retention", "-1"], "retention"),
        (["--batch-size", "0"], "batch_size"),
    ],
)
async def test_the_relay_module_refuses_a_value_before_it_opens_anything(args: list[str], argument: str) -> None:
    """``python -m amqpkit.outbox relay`` checked its values in Relay(), once the database and the broker were
    open: exit 1 after connecting. A broker URL no one answers shows that nothing is opened now."""
    proc = await processes.spawn(
        sys.executable, "-m", "amqpkit.outbox", "relay", "--db", "sqlite:///:memory:",
        "--url", "amqp://guest:guest@127.0.0.1:1/", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 2, text
    assert argument in text and "127.0.0.1:1" not in text, text
