"""The serving process of the measuring scripts (rpc_paired.py, rpc_instructions.py), started and always ended.

The broker's URL reaches it through the environment (``AMQP_URL``), never its command line, which
``ps`` shows to every local user.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

URL_ENV = "AMQP_URL"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def broker_url() -> str:
    """The broker the scripts measure against: ``AMQP_URL``, else guest on 127.0.0.1:5672."""
    return os.environ.get(URL_ENV) or DEFAULT_URL


@contextlib.contextmanager
def serving(argv: list[str], url: str, *, what: str, quiet: bool = False, timeout: float = 120) -> Iterator[None]:
    """Run ``argv`` while the block runs: it prints ``ready`` once it serves and stops at a line on its stdin.

    Left normally, it is told to stop and waited for; left any other way, or still running after
    ``timeout`` seconds, it is killed.
    """
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None,
        text=True, env={**os.environ, URL_ENV: url},
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"{what} did not start")
        yield
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
