"""Commands that run an application's code: ``worker``, ``run`` (a service, in N processes) and ``asyncapi``."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn, ParamSpec

import typer

from ..errors import AmqpkitError, ConnectError
from ..logs import configure_logging
from ..settings import BrokerSettings
from . import UrlOption, app, connect_failed, positive_seconds, settings_for

P = ParamSpec("P")


class _StoppedBeforeStart(BaseException):
    """A SIGINT or SIGTERM before the service runs (a BaseException: the user's module's ``except`` lets it by)."""


def _stops_from_the_start(command: Callable[P, None]) -> Callable[P, None]:
    """A command that runs a service, stopped by SIGINT or SIGTERM from its first line on: exit 0, no traceback.

    Until :func:`~amqpkit.runner.run_until_signal` takes the signals over (the graceful stop, with --grace),
    nothing has started that a stop would wind down: the user's module is being imported, the options read.
    A signal then raises where the code is, even in the middle of that import, and the command ends, exit 0,
    as a stop during the start does. (Before, it ended the process: 143 for a SIGTERM, a KeyboardInterrupt
    traceback for a Ctrl-C.) The handlers there were before are put back at the end.
    """

    @functools.wraps(command)
    def stoppable(*args: P.args, **kwargs: P.kwargs) -> None:
        if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
            return command(*args, **kwargs)
        stopping: list[int] = []

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if not stopping:  # once: a second signal does not break into the way out
                stopping.append(signum)
                raise _StoppedBeforeStart

        previous: dict[signal.Signals, Any] = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
            command(*args, **kwargs)
        except _StoppedBeforeStart:
            typer.echo(f"stopped by {signal.Signals(stopping[0]).name} before the start", err=True)
            raise typer.Exit(0) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return stoppable


def _load_handler(spec: str) -> Any:
    """``package.module:function`` -> the function."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise typer.BadParameter(f"expected MODULE:HANDLER, not {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error while importing the user's module, in one line, as `amqpkit run` says it
        typer.echo(f"error: cannot import {module_name!r}: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise typer.BadParameter(f"{module_name!r} has no {attr!r}") from None


@app.command()
@_stops_from_the_start
def worker(
    handler: Annotated[str, typer.Argument(help="the task handler, as MODULE:FUNCTION")],
    queue: Annotated[str, typer.Option("--queue", "-q", help="work queue name")],
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, max=65535, help="tasks in flight")] = 16,
    max_attempts: Annotated[int, typer.Option("--max-attempts", min=1, help="attempts before dead-lettering")] = 5,
    retry_delay: Annotated[float, typer.Option("--retry-delay", help="first retry delay, seconds")] = 1.0,
    grace: Annotated[float, typer.Option("--grace", min=0, help="seconds running tasks get on SIGTERM")] = 30.0,
    events: Annotated[bool, typer.Option("--events", help="publish task status events on amqpkit.tasks")] = False,
    dedupe: Annotated[bool, typer.Option("--dedupe", help="skip tasks this process already completed")] = False,
    executor: Annotated[
        str | None,
        typer.Option(
            "--executor",
            help="where a plain def handler runs: thread (default, --concurrency threads) or process "
            "(a process pool, for CPU-bound work; the handler must be a module-level function)",
        ),
    ] = None,
    pool_size: Annotated[
        int | None, typer.Option("--pool-size", help="processes of --executor process (default: CPU count)")
    ] = None,
    consumer_timeout: Annotated[
        float | None,
        typer.Option(
            "--consumer-timeout",
            help="seconds a task may run before the broker takes it back: the queue's own x-consumer-timeout "
            "(RabbitMQ 3.12+; on older nodes the node's setting applies, and the worker says so)",
        ),
    ] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="log one JSON object per line")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="log everything, down to DEBUG, aiormq's records too")
    ] = False,
    url: UrlOption = None,
) -> None:
    """Run a worker over a work queue until SIGTERM or Ctrl-C (then finish or requeue, and exit 0).

    Logs go to stdout, one line per event (JSON with --log-json). If the queue
    cannot be consumed any more (deleted, or declared again with other
    arguments, while the connection was down), the worker stops and exits 1
    with the reason. It is `amqpkit run` for a service of one worker.
    """
    from ..patterns.work_queue import MemoryIdempotencyStore, RetryPolicy
    from ..runner import RunOptions
    from ..service import RunningService, Service, ServiceError

    if executor not in (None, "thread", "process"):
        raise typer.BadParameter(f"expected thread or process, not {executor!r}", param_hint="--executor")
    if pool_size is not None and executor != "process":
        raise typer.BadParameter("only with --executor process", param_hint="--pool-size")
    if pool_size is not None and pool_size < 1:
        raise typer.BadParameter(f"must be at least 1, not {pool_size}", param_hint="--pool-size")
    positive_seconds(retry_delay, "--retry-delay")
    positive_seconds(consumer_timeout, "--consumer-timeout")
    configure_logging(json_lines=log_json, verbose=verbose)
    fn = _load_handler(handler)
    service = Service(f"worker-{queue}")
    try:
        service.worker(
            queue, concurrency=concurrency, retry=RetryPolicy(max_attempts=max_attempts, initial_delay=retry_delay),
            events=events, idempotency=MemoryIdempotencyStore() if dedupe else None,
            executor="process" if executor == "process" else "thread" if executor == "thread" else None,
            processes=pool_size, consumer_timeout=consumer_timeout,
        )(fn)  # fmt: skip
    except ServiceError as exc:  # e.g. --executor process with a handler a pool process cannot be given
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    def started(running: RunningService) -> None:
        typer.echo(f"worker on {queue!r}: concurrency {concurrency}; Ctrl-C or SIGTERM stops it", err=True)

    outcome = _run_service(service, url, RunOptions(grace=grace), on_started=started)
    running = outcome.running
    w = next(iter(running.workers.values())) if running is not None else None
    counts = f"{w.completed} completed, {w.retried} retried, {w.dead_lettered} dead-lettered" if w else "not started"
    if outcome.code:
        why = running.failures[0][1] if running is not None and running.failures else outcome.reason
        typer.echo(f"error: worker on {queue!r} stopped ({counts}): {why}", err=True)
        _exit(outcome, outcome.code)
    typer.echo(f"worker stopped: {counts}", err=True)
    _exit(outcome, 0)


def _exit(outcome: Any, code: int) -> NoReturn:
    """End the command with ``code``; at once, with ``os._exit``, when def handlers still run in their threads.

    The interpreter's exit waits for every thread of a handler pool to end, and one that hangs (a socket read
    with no timeout, a lock) never does: the process would stay after its "stopped", until a SIGKILL. The
    service is stopped by now: consumers cancelled, resources closed, the connection closed, so the broker
    has the unfinished calls' messages back (not acknowledged). What remains is only these threads, which
    nothing can stop: the process ends without running them to the end, as a SIGKILL would (a transaction
    they hold open is rolled back by the database when the connection drops), after the logs are flushed.
    """
    from ..executors import running_calls
    from ..runner import EXIT_ABANDONED

    if not outcome.abandoned and not running_calls():
        raise typer.Exit(code)
    _exit_now(code or EXIT_ABANDONED)


def _exit_now(code: int) -> NoReturn:
    def flush() -> None:
        for handler in logging.getLogger().handlers:
            handler.flush()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()

    # In a thread of its own, and not waited for long: a hung handler may hold a lock the flush wants.
    flushing = threading.Thread(target=flush, name="amqpkit-exit-flush", daemon=True)
    flushing.start()
    flushing.join(timeout=2)
    os._exit(code)


def _run_service(
    service: Any, url: str | None, options: Any, *, on_started: Any = None, status_fd: int | None = None
) -> Any:
    """Run ``service`` until a signal (see :func:`amqpkit.runner.serve`); startup errors end the command.

    ``status_fd``: report readiness to a supervising ``amqpkit run --processes N`` on that descriptor.
    """
    from ..runner import Outcome, StatusReporter, run_until_signal, serve
    from ..service import ServiceError

    settings = settings_for(url) if url else (service.settings or BrokerSettings())
    outcome: list[Outcome] = []

    async def main(stop: asyncio.Event) -> int:
        reporter = await StatusReporter(status_fd, stop).start() if status_fd is not None else None
        try:
            result = await serve(service, stop, settings=settings, options=options, on_started=on_started,
                                 on_change=reporter.report if reporter is not None else None)  # fmt: skip
        finally:
            if reporter is not None:
                await reporter.close()
        outcome.append(result)
        return result.code

    try:
        code = run_until_signal(main)
    except ConnectError as exc:
        connect_failed(exc)
    except ServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except AmqpkitError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # a startup hook's or resource's own error: one line (the traceback with --verbose)
        logging.getLogger("amqpkit.runner").debug("the service did not start", exc_info=True)
        typer.echo(f"error: the service did not start: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    if outcome:
        return outcome[0]
    from ..executors import running_calls
    from ..runner import EXIT_ABANDONED

    left = running_calls()  # a second signal cancelled the stop: def handlers it did not wait for may still run
    for call in left:
        logging.getLogger("amqpkit.runner").error(
            "%s: still running at a forced stop; left unfinished and unacknowledged, its message goes back to "
            "the queue", call.describe())  # fmt: skip
    if left:
        return Outcome(code or EXIT_ABANDONED, f"forced stop: {len(left)} handler call(s) left unfinished", None, left)
    return Outcome(code)


@app.command()
@_stops_from_the_start
def run(
    target: Annotated[str, typer.Argument(help="the service, as MODULE:ATTR (an amqpkit Service)")],
    grace: Annotated[float, typer.Option("--grace", min=0, help="seconds running handlers get on SIGTERM")] = 30.0,
    processes: Annotated[
        int, typer.Option("--processes", "-p", min=1, help="run N copies in child processes (CPU-bound handlers)")
    ] = 1,
    health_port: Annotated[
        int | None,
        typer.Option("--health-port", min=0, max=65535, help="serve GET /healthz and /readyz on this port"),
    ] = None,
    health_host: Annotated[
        str, typer.Option("--health-host", help="address of the health endpoints (0.0.0.0 in a container)")
    ] = "127.0.0.1",
    give_up_after: Annotated[
        float | None,
        typer.Option("--give-up-after", help="exit 1 once the broker has been unreachable this many seconds"),
    ] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="log one JSON object per line")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="log everything, down to DEBUG, aiormq's records too")
    ] = False,
    url: UrlOption = None,
    status_fd: Annotated[int | None, typer.Option("--status-fd", hidden=True)] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port", min=0, max=65535, help="serve /metrics in Prometheus text (needs amqpkit[otel])"
        ),
    ] = None,
) -> None:
    """Run a service until SIGTERM or Ctrl-C; then stop taking messages, let handlers finish within --grace, exit 0.

    Logs go to stdout, one line per event (JSON with --log-json). Exit 1 with
    the reason when a consumer or a declared exchange, queue or binding
    cannot be restored after a reconnect, or the broker stays unreachable
    past --give-up-after, or a startup hook raises; exit 2 when MODULE:ATTR
    is not a service, its declarations do not add up, --health-port is
    taken, or no broker answers at start; exit 3 when
    plain def handlers were still running after --grace (a thread cannot be
    stopped: they are left unfinished, named in the log, and their messages
    go back to the queue). A stop during the start ends it, exit 0.
    """
    from ..runner import RunOptions, run_until_signal
    from ..service import RunningService, ServiceError, load_service

    positive_seconds(give_up_after, "--give-up-after")
    configure_logging(json_lines=log_json, verbose=verbose)
    try:
        service = load_service(target)
        service.check()
    except ServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    options = RunOptions(grace=grace, health_port=health_port, health_host=health_host, give_up_after=give_up_after)
    if metrics_port is not None:  # amqpkit.telemetry: instrument this process, serve its metrics
        try:
            if processes > 1:
                raise ValueError("--metrics-port serves one process: use it with --processes 1")
            from ..telemetry import serve_metrics

            serve_metrics(metrics_port, health_host)
        except (ImportError, ValueError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    if processes > 1:
        argv = [sys.executable, "-m", "amqpkit.cli", "run", target, "--grace", str(grace)]
        argv += ["--log-json"] * log_json + ["--verbose"] * verbose
        if give_up_after is not None:
            argv += ["--give-up-after", str(give_up_after)]
        env = dict(os.environ)
        if url:
            env["AMQP_URL"] = url  # in the environment, not on a command line `ps` shows
        typer.echo(f"service {service.name}: {processes} processes; Ctrl-C or SIGTERM stops them", err=True)
        try:
            code = run_until_signal(lambda stop: _supervised(argv, processes, stop, env, options))
        except ServiceError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        raise typer.Exit(code)

    def started(running: RunningService) -> None:
        typer.echo(f"service {service.name} running: {running.describe()}; Ctrl-C or SIGTERM stops it", err=True)

    if status_fd is not None:  # a child of `--processes N`: the supervisor serves the health endpoints
        options = RunOptions(grace=grace, give_up_after=give_up_after)
    outcome = _run_service(service, url, options, on_started=started, status_fd=status_fd)
    if outcome.code:
        typer.echo(f"error: service {service.name} stopped: {outcome.reason}", err=True)
        _exit(outcome, outcome.code)
    typer.echo(f"service {service.name} stopped", err=True)
    _exit(outcome, 0)


@app.command()
def asyncapi(
    target: Annotated[str, typer.Argument(help="the service, as MODULE:ATTR (an amqpkit Service)")],
    output: Annotated[str | None, typer.Option("--output", "-o", help="write to FILE instead of stdout")] = None,
    yaml: Annotated[bool, typer.Option("--yaml", help="YAML instead of JSON")] = False,
    url: UrlOption = None,
) -> None:
    """Write the service's AsyncAPI 3.0.0 document: servers, channels, operations, messages, AMQP bindings.

    Nothing is sent to the broker. The servers come from --url (else AMQP_URL,
    else the service's settings); no password is ever written.
    """
    from ..asyncapi import asyncapi_document, to_json, to_yaml
    from ..service import ServiceError, load_service

    try:
        service = load_service(target)
        settings = settings_for(url) if url else (service.settings or BrokerSettings())
        doc = asyncapi_document(service, settings)
    except ServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    text = to_yaml(doc) if yaml else to_json(doc)
    if output and output != "-":
        Path(output).write_text(text, encoding="utf-8")
        typer.echo(f"AsyncAPI {doc['asyncapi']} document of {service.name} written to {output}", err=True)
    else:
        sys.stdout.write(text)


async def _supervised(argv: list[str], processes: int, stop: asyncio.Event, env: dict[str, str], options: Any) -> int:
    from ..runner import supervise

    outcome = await supervise(argv, processes, stop, env=env, options=options)
    if outcome.code:
        typer.echo(f"error: {outcome.reason}", err=True)
    return outcome.code
