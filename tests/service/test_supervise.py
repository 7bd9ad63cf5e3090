"""`supervise` (`amqpkit run --processes N`): how the children's ends make the supervisor's exit code."""

from __future__ import annotations

import asyncio
import sys

from amqpkit.runner import EXIT_FAILED, EXIT_OK, RunOptions, supervise

# A child with no handler for SIGTERM, as one still importing the service is: the signal ends it (code -15).
STARTING = [sys.executable, "-c", "import time; time.sleep(60)"]
KILLED = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]


async def test_children_ended_by_the_forwarded_sigterm_are_a_clean_stop() -> None:
    """A stop soon after the start: the children, still importing, die of the SIGTERM the supervisor forwards.
    Before: that counted as a failure, and its -15 was the exit status (`amqpkit run --processes 2` exited 241,
    "process 1 exited with code -15", in 3 of 3 runs stopped 2 s after the start). Expected: 0, as for a stop
    during the start of one process."""
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, stop.set)
    outcome = await asyncio.wait_for(supervise(STARTING, 2, stop, options=RunOptions(grace=5)), 30)
    assert (outcome.code, outcome.reason) == (EXIT_OK, None)


async def test_a_child_killed_by_another_signal_fails_with_exit_1() -> None:
    """A child killed by SIGKILL (an OOM killer) is a failure, exit status 1, not its negative return code."""
    outcome = await asyncio.wait_for(supervise(KILLED, 1, asyncio.Event(), options=RunOptions(grace=5)), 30)
    assert outcome.code == EXIT_FAILED, outcome
    assert outcome.reason is not None and "killed by SIGKILL" in outcome.reason, outcome
