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


async def test_the_floor_command_measures_the_hooks_as_they_are() -> None:
    """``--floor`` is one of the guide's "Measuring it yourself" commands. Its stub broker had only ``publish``
    after the hooks moved below it (``Broker._publish``), and the command died on an AttributeError."""
    proc = await processes.spawn(
        sys.executable, str(SCRIPT), "--floor", "--repeats", "1", "--rounds", "1", "--count", "20",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, (out + err).decode()[-2000:]
    text = out.decode()
    for mode in ("noop", "batch", "sampled10", "sampled", "json"):
        assert f"repeat 1 {mode}" in text
    assert "CPU us per message" in text
