"""amqpkit's pytest plugin, as a user's project sees it: a pytest run of its own, in a folder of its own.

The inner run has no configuration of ours (pytest-asyncio in strict mode),
finds the broker the same way, and must leave no vhost behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path

from ..brokerctl import arabbitmqctl

INNER = """
import json, os
import pytest
from pydantic import BaseModel
from amqpkit import Queue, RpcClient, TopologyError
from amqpkit.service import Service
from amqpkit.testing import own_vhost, vhost_of

SEEN = os.environ["SEEN_FILE"]

def seen(url):
    with open(SEEN, "a") as f:
        f.write(json.dumps({"vhost": vhost_of(url), "own": own_vhost(url)}) + "\\n")

@pytest.mark.asyncio
async def test_declares_a_queue(amqp_url, amqp_broker):
    seen(amqp_url)
    await amqp_broker.declare_queue(Queue("fixed-name", durable=True))

@pytest.mark.asyncio
async def test_does_not_see_the_other_tests_queue(amqp_url, amqp_broker):
    seen(amqp_url)
    with pytest.raises(TopologyError, match="NOT_FOUND"):
        await amqp_broker.queue_counts("fixed-name")

class Sum(BaseModel):
    a: int
    b: int

svc = Service("adder")

@svc.rpc("adder")
async def add(req: Sum) -> int:
    return req.a + req.b

@pytest.mark.asyncio
async def test_runs_a_service(amqp_url, service_runner, amqp_broker):
    seen(amqp_url)
    running = await service_runner(svc)
    assert running.ready
    async with RpcClient(amqp_broker, "adder") as client:
        assert await client.call("add", Sum(a=2, b=40), timeout=10) == 42
"""


async def test_a_users_run_gets_a_fresh_vhost_per_test_and_keeps_none(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    seen_file = tmp_path / "seen.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py", cwd=tmp_path,
        env={**os.environ, "SEEN_FILE": str(seen_file)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "3 passed" in text, text
    records = [json.loads(line) for line in seen_file.read_text().splitlines()]
    vhosts = [r["vhost"] for r in records]
    assert len(set(vhosts)) == 3, records  # one each
    assert all(r["own"] and r["vhost"].startswith("amqpkit-test-") for r in records), records
    listed = (await arabbitmqctl("list_vhosts", "-q", "name")).split()
    assert not set(vhosts) & set(listed), listed  # every one deleted by the end of that run


NEEDS_A_URL = """
def test_needs_a_vhost(amqp_url):
    pass
"""


async def run_inner(tmp_path: Path, source: str, env: dict[str, str]) -> tuple[int, str, int]:
    """Run ``source`` as a test file in a pytest of its own; (exit code, output, its pid)."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(source))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py", cwd=tmp_path,
        env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), proc.pid


async def test_a_broker_no_vhost_can_be_made_on_fails_the_run_saying_how(tmp_path: Path) -> None:
    code, text, pid = await run_inner(tmp_path, NEEDS_A_URL, {"AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"})
    assert code != 0, text
    assert "1 error" in text and "skipped" not in text, text  # failed, never skipped
    assert "cannot make a vhost per test on the broker at 127.0.0.1:1" in text, text
    assert "AMQPKIT_TEST_VHOST=0" in text, text
    listed = (await arabbitmqctl("list_vhosts", "-q", "name")).split()
    assert not [v for v in listed if f"-{pid}-" in v], listed  # the vhost it made to try is gone too


async def test_amqpkit_test_vhost_0_keeps_the_urls_own_vhost(tmp_path: Path) -> None:
    source = """
    from amqpkit.testing import own_vhost, vhost_of

    def test_shared(amqp_url):
        assert vhost_of(amqp_url) == "/" and not own_vhost(amqp_url)
    """
    code, text, _ = await run_inner(tmp_path, source, {"AMQPKIT_TEST_VHOST": "0", "AMQP_URL": ""})
    assert code == 0 and "1 passed" in text, text
