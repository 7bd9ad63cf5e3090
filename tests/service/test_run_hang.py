"""`amqpkit run` with a plain-def handler that hangs: SIGTERM must still end the process after --grace."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from amqpkit import Broker, Envelope
from amqpkit.runner import EXIT_ABANDONED

from .test_run_cli import Run


@pytest.mark.usefixtures("spawned")
async def test_sigterm_ends_a_service_whose_sync_handler_hangs(amqp_url: str, broker: Broker, name: str) -> None:
    """A `def` handler blocked for good (here time.sleep(3600)); SIGTERM with --grace 2. The documented stop is:
    stop taking messages, give running handlers --grace seconds, exit; a handler still running then is left
    unfinished, said in the log and by exit status 3, its message back in the queue. Before: the service logged
    that it stopped and then never exited: the interpreter's exit joins the thread pool's threads, and the hung
    one never ends (still running 30 s after the SIGTERM; only SIGKILL ends it, so an orchestrator's stop takes
    its whole kill timeout and the task's message is redelivered only then)."""
    run = await Run.start("tests.service.hang_apps:hangs", "--grace", "2",
                          env={"AMQP_URL": amqp_url, "SVC_PREFIX": name})  # fmt: skip
    try:
        await run.until_err("service hangs running")
        await broker.publish(Envelope(b"{}", content_type="application/json"), routing_key=f"{name}.jobs")
        for _ in range(100):
            if any("handler started" in line for line in run.out):
                break
            await asyncio.sleep(0.1)
        assert any("handler started" in line for line in run.out), run.text()
        began = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        try:
            code = await run.exit(timeout=30)
        except TimeoutError:
            raise AssertionError(
                f"still running {time.monotonic() - began:.0f} s after SIGTERM with --grace 2\n{run.text()}"
            ) from None
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
    finally:
        if run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()
        await broker.delete_queue(f"{name}.jobs")
        await broker.delete_queue(f"{name}.jobs.dlq")


@pytest.mark.usefixtures("spawned")
async def test_sigterm_during_startup_stops_the_service_without_starting_its_handlers(
    amqp_url: str, broker: Broker, name: str
) -> None:
    """SIGTERM while a startup hook waits (60 s here: a database not up yet). Expected: the start is ended, no
    handler is attached, the process exits within a few seconds. Before: the SIGTERM was only noted; the process
    ran on until the hook returned (59.9 s), then attached its worker ("started: worker on ...") and only then
    stopped."""
    run = await Run.start("tests.service.hang_apps:slow_start", "--grace", "2",
                          env={"AMQP_URL": amqp_url, "SVC_PREFIX": name})  # fmt: skip
    try:
        for _ in range(100):
            if any("startup hook waiting" in line for line in run.out):
                break
            await asyncio.sleep(0.1)
        assert any("startup hook waiting" in line for line in run.out), run.text()
        began = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        try:
            code = await run.exit(timeout=20)
        except TimeoutError:
            took = time.monotonic() - began
            raise AssertionError(f"still running {took:.0f} s after SIGTERM\n{run.text()}") from None
        assert not any("started: worker" in line for line in run.out), run.text()
        assert code == 0, run.text()  # a clean stop: nothing was started, nothing left
    finally:
        if run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()
        await broker.delete_queue(f"{name}.jobs")
        await broker.delete_queue(f"{name}.jobs.dlq")


@pytest.mark.usefixtures("spawned")
async def test_a_second_sigterm_ends_a_service_whose_sync_handler_hangs_before_the_grace(
    amqp_url: str, broker: Broker, name: str
) -> None:
    """A second SIGTERM (or Ctrl-C) cancels the stop without waiting for --grace 30: with the hung handler's
    thread still there, the process must end all the same (exit 3, the call named), not hang at exit."""
    run = await Run.start("tests.service.hang_apps:hangs", "--grace", "30",
                          env={"AMQP_URL": amqp_url, "SVC_PREFIX": name})  # fmt: skip
    try:
        await run.until_err("service hangs running")
        await broker.publish(Envelope(b"{}", content_type="application/json"), routing_key=f"{name}.jobs")
        for _ in range(100):
            if any("handler started" in line for line in run.out):
                break
            await asyncio.sleep(0.1)
        assert any("handler started" in line for line in run.out), run.text()
        began = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1)
        run.proc.send_signal(signal.SIGTERM)
        try:
            code = await run.exit(timeout=20)
        except TimeoutError:
            raise AssertionError(
                f"still running {time.monotonic() - began:.0f} s after SIGTERM\n{run.text()}"
            ) from None
        assert time.monotonic() - began < 10, run.text()
        assert code == EXIT_ABANDONED, run.text()
        assert any("forced stop" in line and "amqpkit-" in line for line in run.out), run.text()
    finally:
        if run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()
        await broker.delete_queue(f"{name}.jobs")
        await broker.delete_queue(f"{name}.jobs.dlq")
