"""The python blocks of README.md and patterns/custom-pattern.md type-check under mypy --strict and run.

Documented usage that does not type-check, or no longer runs, fails here
rather than in a reader's editor.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The documents whose python blocks are whole programs, checked and run as they are.
PROGRAMS = ["README.md", "patterns/custom-pattern.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(document: str) -> list[str]:
    return BLOCK.findall((ROOT / document).read_text())


def write_blocks(tmp_path: Path, document: str) -> list[Path]:
    stem = re.sub(r"\W", "_", Path(document).stem)
    paths = []
    for i, code in enumerate(blocks(document)):
        path = tmp_path / f"{stem}_{i}.py"
        path.write_text(code)
        paths.append(path)
    return paths


@pytest.mark.parametrize("document", PROGRAMS)
def test_the_blocks_type_check_strictly(document: str, tmp_path: Path) -> None:
    paths = write_blocks(tmp_path, document)
    assert paths, f"{document} has no python block"
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", *map(str, paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("document", PROGRAMS)
def test_the_blocks_run(document: str, tmp_path: Path, amqp_url: str) -> None:
    for path in write_blocks(tmp_path, document):
        result = subprocess.run(
            [sys.executable, str(path)],
            cwd=tmp_path,
            env={**os.environ, "AMQP_URL": amqp_url},
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_custom_pattern_gathers_every_reply(tmp_path: Path, amqp_url: str) -> None:
    (path,) = write_blocks(tmp_path, "patterns/custom-pattern.md")
    result = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env={**os.environ, "AMQP_URL": amqp_url},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.stdout.strip().splitlines()[-1] == "[10, 12]", result.stdout + result.stderr
