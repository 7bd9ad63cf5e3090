"""The tutorials type-check under mypy --strict.

Each tutorial is a folder of scripts, and several share names (send.py,
receive.py), which one mypy run cannot tell apart: they are checked in as
few runs as keep the names apart.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def batches() -> list[list[Path]]:
    """The tutorials' files, in groups with no file name twice."""
    groups: list[list[Path]] = []
    for path in sorted((ROOT / "tutorials").rglob("*.py")):
        group = next((g for g in groups if all(p.name != path.name for p in g)), None)
        if group is None:
            group = []
            groups.append(group)
        group.append(path)
    return groups


def test_the_tutorials_type_check_strictly() -> None:
    groups = batches()
    assert groups, "no tutorial found"
    failures = []
    for group in groups:
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", *map(str, group)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            failures.append(result.stdout + result.stderr)
    assert failures == [], "\n".join(failures)
