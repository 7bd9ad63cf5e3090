"""scripts/rpc_paired.py: amqpkit's RPC and bare aiormq's, call by call in one run (issue 18's overhead figure).

Checked: it runs against the broker the tests use, times as many calls of each as asked, and writes
figures that agree with each other.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from . import processes

pytestmark = pytest.mark.usefixtures("spawned")  # every process a test starts is ended, whatever the outcome

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rpc_paired.py"


async def test_the_paired_run_times_both_and_writes_consistent_figures(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "paired.json"
    argv = [sys.executable, str(SCRIPT), "--calls", "200", "--blocks", "4", "--out", str(out)]
    proc = await processes.spawn(
        *argv, env={**os.environ, "AMQP_URL": amqp_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out_bytes, err_bytes = await asyncio.wait_for(proc.communicate(), 120)
    stdout = out_bytes.decode()
    assert proc.returncode == 0, err_bytes.decode()
    figures = json.loads(out.read_text())
    assert figures["loop"] == "asyncio"
    assert figures["calls"] == 200
    p50 = figures["p50_us"]
    assert 0 < p50["rpc"] < 1_000_000 and 0 < p50["raw-rpc"] < 1_000_000
    assert figures["ratio_of_medians"] == pytest.approx(p50["rpc"] / p50["raw-rpc"])
    assert len(figures["ratio_per_block"]) == 4
    assert all(0.1 < r < 10 for r in [*figures["ratio_per_block"], figures["median_pair_ratio"]])
    assert f"ratio of medians: {figures['ratio_of_medians']:.3f}" in stdout
    assert "@" not in " ".join(argv)  # the URL goes through the environment, not the command line
