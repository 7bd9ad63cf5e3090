"""`amqpkit outbox relay`: the relay as its own process, from the command line."""

from __future__ import annotations

import os
import subprocess
import sys


def test_an_unreachable_database_is_one_line_and_exit_2_without_the_password() -> None:
    env = {**os.environ, "AMQPKIT_OUTBOX_DB": "postgresql://relay:S3cretPw@127.0.0.1:1/outbox"}
    result = subprocess.run(
        [sys.executable, "-m", "amqpkit.cli", "outbox", "relay"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0], result.stderr
    assert "S3cretPw" not in result.stderr + result.stdout
