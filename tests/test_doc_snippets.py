"""The python blocks of README.md and the pattern guides type-check under mypy --strict and run.

Documented usage that does not type-check, or no longer runs, fails here
rather than in a reader's editor. The fence's info string says what a block is:

- ```` ```python ````: a whole program. Type-checked (mypy --strict), then run
  on its own against the broker, in the test's own vhost (``AMQP_URL``); it
  must exit 0. A program that waits for a message waits with a timeout, so a
  message that never comes fails the run; it deletes what it declared, or
  leaves it to the vhost, which is deleted after the test. Keep it to a few
  seconds: this whole file should run in about a minute (CI runs it twice).
- ```` ```python check ````: a whole program, type-checked only, because running
  it needs what a test cannot give in seconds: a cluster, a service running,
  a second process, minutes of time. The guide's prose says what it needs.
- ```` ```python fragment ````: not a program (a signature, a one-line
  illustration); neither checked nor run. Keep these rare: a reader should be
  able to paste most blocks and run them.

Any other info string after ``python`` fails the test, so a typo cannot
quietly take a block out of the checks. Every guide in patterns/ is either
in ``DOCUMENTS`` or, until its blocks are whole programs, in ``NOT_YET``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The documents whose python blocks follow the convention above.
DOCUMENTS = [
    "README.md",
    "patterns/README.md",
    "patterns/custom-pattern.md",
    "patterns/publish-subscribe.md",
    "patterns/routing.md",
    "patterns/publisher-confirms.md",
    "patterns/rpc.md",
    "patterns/work-queue.md",
    "patterns/cluster.md",
    "patterns/outbox-inbox.md",
    "patterns/observability.md",
    "patterns/services.md",
]
# Guides whose blocks are still fragments: not checked yet.
NOT_YET = [
    "patterns/rpc-vs-messaging.md",
]
KINDS = {"": "program", "check": "check", "fragment": "fragment"}
# The last line some programs print, as the guide says: (document, index among its programs) -> line.
LAST_LINE = {
    ("patterns/custom-pattern.md", 0): "[10, 12]",
    ("patterns/publish-subscribe.md", 0): "disk almost full",
    ("patterns/publish-subscribe.md", 1): "disk almost full",
    ("patterns/routing.md", 0): "kern.critical disk failed",
    ("patterns/routing.md", 1): "unroutable: exchange 'topic_logs' routing key 'nobody.listens': NO_ROUTE",
    ("patterns/publisher-confirms.md", 0): "2000 []",
    ("patterns/rpc.md", 0): "ok=True",
    ("patterns/work-queue.md", 0): "resized cat.png to 640",
    ("patterns/outbox-inbox.md", 0): "due 25",
    ("patterns/outbox-inbox.md", 1): "charged 7",
    ("patterns/observability.md", 0): "['CONSUMER process logs', 'PRODUCER send logs']",
    ("patterns/services.md", 0): "INV-00001 for order 1",
    ("patterns/services.md", 1): "processed 1 duplicates 1",
    ("patterns/services.md", 2): "hello",
}
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class Block:
    document: str
    line: int  # the fence's line in the document
    kind: str
    code: str

    @property
    def filename(self) -> str:
        """Unique over every document, and says where the block is: publish_subscribe_L17.py."""
        stem = re.sub(r"\W", "_", Path(self.document).stem)
        return f"{stem}_L{self.line}.py"

    def write(self, directory: Path) -> Path:
        path = directory / self.filename
        path.write_text(self.code)
        return path


def blocks(document: str) -> list[Block]:
    text = (ROOT / document).read_text()
    found = []
    for match in FENCE.finditer(text):
        info = match.group(1).strip()
        assert info in KINDS, f"{document}: unknown python block kind {info!r} (use one of {sorted(KINDS)})"
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(document, line, KINDS[info], match.group(2)))
    return found


def run_program(block: Block, directory: Path, amqp_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(block.write(directory))],
        cwd=directory,
        env={**os.environ, "AMQP_URL": amqp_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_guide_is_checked_or_listed_as_not_yet() -> None:
    guides = {str(p.relative_to(ROOT)) for p in (ROOT / "patterns").glob("*.md")}
    assert guides - {"patterns/README.md"} <= set(DOCUMENTS) | set(NOT_YET)
    assert not set(DOCUMENTS) & set(NOT_YET)


def test_the_blocks_type_check_strictly(tmp_path: Path) -> None:
    """One mypy run over every program and check block of every document."""
    checked = [b for d in DOCUMENTS for b in blocks(d) if b.kind in ("program", "check")]
    assert len(checked) >= len(DOCUMENTS) - 1  # patterns/README.md has none
    paths = [b.write(tmp_path) for b in checked]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", *map(str, paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # publish_subscribe_L17.py:3 is the third line of the block whose fence is line 17.
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if any(b.kind == "program" for b in blocks(d))])
def test_the_programs_run(document: str, tmp_path: Path, amqp_url: str) -> None:
    programs = [b for b in blocks(document) if b.kind == "program"]
    for i, block in enumerate(programs):
        result = run_program(block, tmp_path, amqp_url)
        output = f"{block.filename}\n{result.stdout}{result.stderr}"
        assert result.returncode == 0, output
        if (document, i) in LAST_LINE:
            assert result.stdout.strip().splitlines()[-1:] == [LAST_LINE[document, i]], output
