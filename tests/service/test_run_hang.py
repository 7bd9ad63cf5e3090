"""`amqpkit run` with a plain-def handler that hangs: SIGTERM must still end the process after --grace."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator

import pytest

from amqpkit import Broker, Envelope
from amqpkit.runner import EXIT_ABANDONED

from .test_run_cli import Run


@contextlib.asynccontextmanager
async def app(spec: str, grace: str, amqp_url: str, broker: Broker, name: str) -> AsyncIterator[Run]:
    """``amqpkit run spec --grace grace``, killed if still running at the end, its queues deleted."""
    run = await Run.start(spec, "--grace", grace, env={"AMQP_URL": amqp_url, "SVC_PREFIX": name})
    try:
        yield run
    finally:
        if run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()
        await broker.delete_queue(f"{name}.jobs")
        await broker.delete_queue(f"{name}.jobs.dlq")


async def until_out(run: Run, text: str) -> None:
    """Wait up to 10 s for a line of ``run``'s output with ``text``."""
    for _ in range(100):
        if any(text in line for line in run.out):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {text!r} in 10 s\n{run.text()}")


async def hung_handler(run: Run, broker: Broker, name: str) -> None:
    """Send the app a task, whose handler blocks for good, and wait until it runs."""
    await run.until_err("service hangs running")
    await broker.publish(Envelope(b"{}", content_type="application/json"), routing_key=f"{name}.jobs")
    await until_out(run, "handler started")


async def exit_after(run: Run, began: float, timeout: float) -> int:
    """The exit status of ``run``, which was sent a SIGTERM at ``began``; AssertionError past ``timeout``."""
    try:
        return await run.exit(timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"still running {time.monotonic() - began:.0f} s after SIGTERM\n{run.text()}") from None


@pytest.mark.usefixtures("spawned")
async def test_sigterm_ends_a_service_whose_sync_handler_hangs(amqp_url: str, broker: Broker, name: str) -> None:
    """A `def` handler blocked for good (here time.sleep(3600)); SIGTERM with --grace 2. The documented stop is:
    stop taking messages, give running handlers --grace seconds, exit; a handler still running then is left
    unfinished, said in the log and by exit status 3, its message back in the queue. Before: the service logged
    that it stopped and then never exited: the interpreter's exit joins the thread pool's threads, and the hung
    one never ends (still running 30 s after the SIGTERM; only SIGKILL ends it, so an orchestrator's stop takes
    its whole kill timeout and the task's message is redelivered only then)."""
    async with app("tests.service.hang_apps:hangs", "2", amqp_url, broker, name) as run:
        await hung_handler(run, broker, name)
        began = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        code = await exit_after(run, began, 30)
        assert time.monotonic() - began < 15, run.text()
        # Not a clean stop: the handler was left unfinished. Exit 3 says so, and the log names what was left.
        assert code == EXIT_ABANDONED, run.text()
        left = [line for line in run.out if "still running" in line and "ERROR" in line]
        assert left and "amqpkit-" in left[0] and "stuck" in left[0], run.text()
        # Its message was not acknowledged: the broker has it back, to deliver again.
        back = None
        for _ in range(50):  # the broker requeues it as it closes the channel: polled, not read once
            if (back := await broker.get(f"{name}.jobs")) is not None:
                break
            await asyncio.sleep(0.1)
        assert back is not None and back.redelivered, run.text()
        await back.ack()


@pytest.mark.usefixtures("spawned")
async def test_sigterm_during_startup_stops_the_service_without_starting_its_handlers(
    amqp_url: str, broker: Broker, name: str
) -> None:
    """SIGTERM while a startup hook waits (60 s here: a database not up yet). Expected: the start is ended, no
    handler is attached, the process exits within a few seconds. Before: the SIGTERM was only noted; the process
    ran on until the hook returned (59.9 s), then attached its worker ("started: worker on ...") and only then
    stopped."""
    async with app("tests.service.hang_apps:slow_start", "2", amqp_url, broker, name) as run:
        await until_out(run, "startup hook waiting")
        began = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        code = await exit_after(run, began, 20)
        assert not any("started: worker" in line for line in run.out), run.text()
        assert code == 0, run.text()  # a clean stop: nothing was started, nothing left


@pytest.mark.usefixtures("spawned")
async def test_a_second_sigterm_ends_a_service_whose_sync_handler_hangs_before_the_grace(
    amqp_url: str, broker: Broker, name: str
) -> None:
    """A second SIGTERM (or Ctrl-C) cancels the stop without waiting for --grace 30: with the hung handler's
    thread still there, the process must end all the same (exit 3, the call named), not hang at exit."""
    async with app("tests.service.hang_apps:hangs", "30", amqp_url, broker, name) as run:
        await hung_handler(run, broker, name)
        began = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1)
        run.proc.send_signal(signal.SIGTERM)
        code = await exit_after(run, began, 20)
        assert time.monotonic() - began < 10, run.text()
        assert code == EXIT_ABANDONED, run.text()
        assert any("forced stop" in line and "amqpkit-" in line for line in run.out), run.text()
