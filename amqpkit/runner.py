"""Run a service until SIGINT or SIGTERM, then let it shut down gracefully.

``run_until_signal(main)`` calls ``main(stop)`` with an :class:`asyncio.Event`
that is set on the first SIGINT/SIGTERM; ``main`` waits on it, cleans up and
returns. A second signal cancels ``main``. No traceback reaches the terminal
for a signal: the process exits 0 (or what ``main`` returned).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

__all__ = ["run_until_signal"]

Main = Callable[[asyncio.Event], Awaitable[int | None]]


def run_until_signal(main: Main) -> int:
    """Run ``main(stop)`` in a new event loop; returns its exit code (0 when it returns None)."""
    # Tutorials and workers print progress that a pipe must see at once.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return asyncio.run(_supervise(main))
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0


async def _supervise(main: Main) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.ensure_future(main(stop))

    def on_signal() -> None:
        if stop.is_set():
            task.cancel()
        stop.set()

    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    try:
        result = await task
    except asyncio.CancelledError:
        return 0
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return int(result or 0)
