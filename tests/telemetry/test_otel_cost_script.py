"""scripts/otel_cost.py refuses, before any trial, a set of modes it could not report on."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from .. import processes

pytestmark = pytest.mark.usefixtures("spawned")  # every process a test starts is ended, whatever the outcome

SCRIPT = Path(__file__).resolve().parent.parent.parent / "scripts" / "otel_cost.py"


async def test_modes_without_off_are_refused_before_any_trial(tmp_path: Path) -> None:
    """Every figure is a ratio to ``off``: without it the script ran every trial, then died on a KeyError."""
    out_file = tmp_path / "cost.json"
    proc = await processes.spawn(
        sys.executable, str(SCRIPT), "--modes", "batch", "header", "--seconds", "0.1", "--repeats", "1",
        "--out", str(out_file), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, (out + err).decode()[-2000:]
    assert b"repeat 1" not in out  # no trial ran
    assert b"--modes must include off" in err
    assert not out_file.exists()
