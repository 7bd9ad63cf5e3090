"""The official AsyncAPI 3.0.0 JSON Schema, from the npm package @asyncapi/specs, fetched once into a cache.

The cache is outside the checkout (``$AMQPKIT_CACHE``, else ``$XDG_CACHE_HOME/amqpkit``, else
``~/.cache/amqpkit``); the schema is never copied into the repository. ``npm pack`` fetches the
package's tarball from the registry npm is configured for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any, cast

import pytest

SPECS_PACKAGE = "@asyncapi/specs"
SPECS_VERSION = "6.11.1"
SCHEMA_MEMBER = "package/schemas/3.0.0.json"


def cache_dir() -> Path:
    base = os.environ.get("AMQPKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "amqpkit"
    )
    return Path(base)


def asyncapi_3_schema() -> dict[str, Any]:
    """The schema, fetched with npm the first time."""
    target = cache_dir() / f"asyncapi-specs-{SPECS_VERSION}" / "3.0.0.json"
    if not target.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(
                "the AsyncAPI check fetches the official schema with npm, which is not installed: "
                "apt-get install npm (or install Node.js), then run the tests again",
                pytrace=False,
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            done = subprocess.run(
                [npm, "pack", f"{SPECS_PACKAGE}@{SPECS_VERSION}", "--silent", "--pack-destination", work],
                capture_output=True, text=True, timeout=300, cwd=work,
            )  # fmt: skip
            if done.returncode != 0:
                pytest.fail(f"npm pack {SPECS_PACKAGE}@{SPECS_VERSION} failed: {done.stderr.strip()}", pytrace=False)
            tarball = next(Path(work).glob("*.tgz"))
            with tarfile.open(tarball) as archive:
                member = archive.extractfile(SCHEMA_MEMBER)
                assert member is not None, f"{SCHEMA_MEMBER} is not in {tarball.name}"
                data = member.read()
            partial = target.with_suffix(".part")
            partial.write_bytes(data)
            partial.replace(target)  # whole or not at all, for a run that stops half way
    return cast(dict[str, Any], json.loads(target.read_text(encoding="utf-8")))
