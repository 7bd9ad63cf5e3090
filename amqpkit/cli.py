"""The ``amqpkit`` command line. Thin: it parses, calls the library, prints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from ._version import __version__
from .bench.run import DEFAULT_SCENARIOS
from .connection import Broker
from .errors import AmqpkitError, ConnectError, PublishError, RpcError, TopologyError
from .logs import configure_logging
from .settings import BrokerSettings

if TYPE_CHECKING:
    from rich.progress import TaskID

app = typer.Typer(
    name="amqpkit",
    help="RabbitMQ messaging patterns, tutorials and a benchmark of RPC against one-way messaging.",
    no_args_is_help=True,
    add_completion=False,
)

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="AMQP_URL",
        help="AMQP URL (default: AMQP_URL, else amqp://guest:guest@127.0.0.1:5672/). "
        "Give a password through AMQP_URL: `ps` shows a command line to every local user.",
    ),
]

BROKER_HINT = (
    "start one with `rabbitmq-server -detached` (Debian: apt-get install rabbitmq-server), "
    "or `docker compose up -d` from the amqpkit checkout, or point AMQP_URL at yours"
)
CREDENTIALS_HINT = "the user and password are those of the URL given by --url, else AMQP_URL"


def connect_failed(exc: ConnectError, *, unreachable: str = "") -> NoReturn:
    """Say why the connection failed, with the hint that fits the cause; exit 2.

    ``unreachable`` goes before the text when no broker answered.
    """
    if exc.reason == "refused":
        typer.echo(f"error: {exc}; {CREDENTIALS_HINT}", err=True)
    else:
        typer.echo(f"error: {unreachable}{exc}; {BROKER_HINT}", err=True)
    raise typer.Exit(2) from None


def command_logging(level: int = logging.ERROR) -> None:
    """Logs of the short commands: to stderr, from ``level`` up, without the client libraries' records.

    Their own ``error:`` line tells the outcome; the log adds only what it does not say.
    """
    configure_logging(stream=sys.stderr, level=level)


def settings_for(url: str | None) -> BrokerSettings:
    if url:
        return BrokerSettings(url=[u.strip() for u in url.split(",") if u.strip()])
    return BrokerSettings()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"amqpkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """amqpkit: asyncio messaging toolkit for RabbitMQ."""


@app.command()
def check(url: UrlOption = None) -> None:
    """Connect to the broker and print what it is."""
    command_logging()

    async def run() -> tuple[str, str]:
        settings = settings_for(url).model_copy(
            update={"reconnect": BrokerSettings().reconnect.model_copy(update={"connect_attempts": 1})}
        )
        async with Broker(settings) as broker:
            return broker.server_product

    try:
        product, version = asyncio.run(run())
    except ConnectError as exc:
        connect_failed(exc)
    typer.echo(f"ok: {product} {version} at {', '.join(settings_for(url).safe_urls)}")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"expected numbers separated by commas, not {text!r}") from None


@app.command()
def bench(
    url: UrlOption = None,
    scenario: Annotated[
        str,
        typer.Option(
            "--scenario",
            "-s",
            help="comma-separated: rpc, rpc-reply-queue, oneway, oneway-confirmed, raw-rpc, raw-oneway, "
            "workqueue (async def), workqueue-sync (def, threads), workqueue-process (def, process pool), "
            "aiopika-rpc, aiopika-workqueue, http-rpc (both HTTP clients: http-rpc-aiohttp, "
            "http-rpc-httpx), grpc-rpc, chain-rpc, chain-events, chain-http",
        ),
    ] = ",".join(DEFAULT_SCENARIOS),
    concurrency: Annotated[
        str, typer.Option("--concurrency", "-c", help="closed loop: in-flight levels to sweep")
    ] = "1,8,64",
    rate: Annotated[
        float | None, typer.Option("--rate", help="open loop: messages per second (latency from intended send time)")
    ] = None,
    messages: Annotated[int | None, typer.Option("--messages", "-n", help="measured messages per run")] = None,
    duration: Annotated[float | None, typer.Option("--duration", help="seconds per run instead of --messages")] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", help="warm-up messages per run, discarded")] = None,
    size: Annotated[int, typer.Option("--size", help="body size in bytes")] = 128,
    queue_type: Annotated[
        str, typer.Option("--queue-type", help="oneway-confirmed queue: classic or quorum")
    ] = "classic",
    inproc: Annotated[bool, typer.Option("--inproc", help="run the serving side in this process")] = False,
    workers: Annotated[int, typer.Option("--workers", help="worker processes for the workqueue scenarios")] = 1,
    prefetch: Annotated[int, typer.Option("--prefetch", help="prefetch of servers and consumers")] = 256,
    repeat: Annotated[int, typer.Option("--repeat", help="runs of the whole sweep, interleaved; shows the spread")] = 1,
    json_path: Annotated[str | None, typer.Option("--json", help="write results as JSON to PATH ('-': stdout)")] = None,
    plot_path: Annotated[str | None, typer.Option("--plot", help="draw latency against throughput to PATH.png")] = None,
    burst: Annotated[
        str | None,
        typer.Option("--burst", help="open-loop profile RATE:SECONDS,... (e.g. 1600:10,400:20), per-second report"),
    ] = None,
    service_ms: Annotated[
        float, typer.Option("--service-ms", help="each server's work per request, ms (at most --prefetch at once)")
    ] = 0.0,
    deadline: Annotated[float, typer.Option("--deadline", help="a caller's deadline in seconds")] = 30.0,
    task_cpu_ms: Annotated[
        float, typer.Option("--task-cpu-ms", help="workqueue scenarios: busy CPU work per task, ms")
    ] = 0.0,
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            metavar="NAME=URL",
            help="repeatable: run against each broker, interleaved, with ratios to the first: NAME=URL "
            "(URL,URL,... for a cluster; NAME=@VAR reads them from VAR, keeping a password off the command line)",
        ),
    ] = None,
    otel: Annotated[
        str | None,
        typer.Option(
            "--otel", metavar="MODES", help="comma-separated: off, noop, batch; each instrumentation mode, interleaved"
        ),
    ] = None,
    loop: Annotated[str, typer.Option("--loop", help="event loop: asyncio, uvloop, or asyncio,uvloop for both")] = (
        "asyncio"
    ),
    stall_ms: Annotated[int, typer.Option("--stall-ms", hidden=True)] = 0,
    stall_after: Annotated[int, typer.Option("--stall-after", hidden=True)] = 0,
) -> None:
    """Measure RPC against messaging, HTTP and gRPC on a real broker: latency percentiles and throughput."""
    from pydantic import ValidationError
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .bench import BenchParams, MissingDependency, run_loops
    from .bench.burst import parse_profile
    from .bench.compare import parse_target
    from .bench.report import plot, print_report

    command_logging(logging.CRITICAL)  # the report says what failed
    settings = settings_for(url)
    try:
        profile = parse_profile(burst) if burst is not None else None
        targets = tuple(parse_target(t) for t in target or ())
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        params = BenchParams(
            url=settings.urls[0],
            scenarios=tuple(s.strip() for s in scenario.split(",") if s.strip()),
            concurrency=_int_list(concurrency),
            rate=rate,
            messages=messages,
            duration=duration,
            warmup=warmup,
            size=size,
            queue_type=queue_type,
            inproc=inproc,
            repeat=repeat,
            workers=workers,
            prefetch=prefetch,
            stall_ms=stall_ms,
            stall_after=stall_after,
            burst=profile,
            service_ms=service_ms,
            deadline=deadline,
            loop=tuple(part.strip() for part in loop.split(",") if part.strip()),
            task_cpu_ms=task_cpu_ms,
            targets=targets,
            otel=tuple(part.strip() for part in (otel or "").split(",") if part.strip()),
        )
    except ValidationError as exc:
        message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from None
    to_stdout = json_path == "-"
    console = Console(stderr=to_stdout)
    if not console.is_terminal:
        console.width = max(console.width, 180 if len(params.arms()) > 1 else 132)  # side by side is wide
    progress = Progress(
        TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )  # fmt: skip
    tasks: dict[str, TaskID] = {}

    def on_progress(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = progress.add_task(label, total=total)
        progress.update(tasks[label], completed=done)

    try:
        with progress:
            result = run_loops(params, on_progress=on_progress)
    except ConnectError as exc:
        connect_failed(exc, unreachable="no broker: ")
    except MissingDependency as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    print_report(result, console)
    if json_path:
        if to_stdout:
            sys.stdout.write(result.to_json() + "\n")
        else:
            Path(json_path).write_text(result.to_json() + "\n")
            console.print(f"results written to {json_path}")
    if plot_path:
        plot(result, plot_path)
        console.print(f"plot written to {plot_path}")


def _load_handler(spec: str) -> Any:
    """``package.module:function`` -> the function."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise typer.BadParameter(f"expected MODULE:HANDLER, not {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise typer.BadParameter(f"cannot import {module_name!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise typer.BadParameter(f"{module_name!r} has no {attr!r}") from None


@app.command()
def worker(
    handler: Annotated[str, typer.Argument(help="the task handler, as MODULE:FUNCTION")],
    queue: Annotated[str, typer.Option("--queue", "-q", help="work queue name")],
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="tasks in flight")] = 16,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="attempts before dead-lettering")] = 5,
    retry_delay: Annotated[float, typer.Option("--retry-delay", help="first retry delay, seconds")] = 1.0,
    grace: Annotated[float, typer.Option("--grace", help="seconds running tasks get on SIGTERM")] = 30.0,
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
    from .patterns.work_queue import MemoryIdempotencyStore, RetryPolicy
    from .runner import RunOptions
    from .service import RunningService, Service, ServiceError

    if executor not in (None, "thread", "process"):
        raise typer.BadParameter(f"expected thread or process, not {executor!r}", param_hint="--executor")
    if pool_size is not None and executor != "process":
        raise typer.BadParameter("only with --executor process", param_hint="--pool-size")
    if pool_size is not None and pool_size < 1:
        raise typer.BadParameter(f"must be at least 1, not {pool_size}", param_hint="--pool-size")
    if consumer_timeout is not None and not consumer_timeout > 0:
        raise typer.BadParameter(f"seconds, more than 0, not {consumer_timeout:g}", param_hint="--consumer-timeout")
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
        raise typer.Exit(outcome.code)
    typer.echo(f"worker stopped: {counts}", err=True)
    raise typer.Exit(0)


def _run_service(
    service: Any, url: str | None, options: Any, *, on_started: Any = None, status_fd: int | None = None
) -> Any:
    """Run ``service`` until a signal (see :func:`amqpkit.runner.serve`); startup errors end the command.

    ``status_fd``: report readiness to a supervising ``amqpkit run --processes N`` on that descriptor.
    """
    from .runner import Outcome, StatusReporter, run_until_signal, serve
    from .service import ServiceError

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
    return outcome[0] if outcome else Outcome(code)


@app.command()
def run(
    target: Annotated[str, typer.Argument(help="the service, as MODULE:ATTR (an amqpkit Service)")],
    grace: Annotated[float, typer.Option("--grace", help="seconds running handlers get on SIGTERM")] = 30.0,
    processes: Annotated[
        int, typer.Option("--processes", "-p", min=1, help="run N copies in child processes (CPU-bound handlers)")
    ] = 1,
    health_port: Annotated[
        int | None, typer.Option("--health-port", help="serve GET /healthz and /readyz on this port")
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
        int | None, typer.Option("--metrics-port", help="serve /metrics in Prometheus text (needs amqpkit[otel])")
    ] = None,
) -> None:
    """Run a service until SIGTERM or Ctrl-C; then stop taking messages, let handlers finish within --grace, exit 0.

    Logs go to stdout, one line per event (JSON with --log-json). Exit 1 with
    the reason when a consumer or a declared exchange, queue or binding
    cannot be restored after a reconnect, or the broker stays unreachable
    past --give-up-after; exit 2 when MODULE:ATTR is not a service, its
    declarations do not add up, or no broker answers at start.
    """
    from .runner import RunOptions, run_until_signal
    from .service import RunningService, ServiceError, load_service

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
            from .telemetry import serve_metrics

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
        code = run_until_signal(lambda stop: _supervised(argv, processes, stop, env, options))
        raise typer.Exit(code)

    def started(running: RunningService) -> None:
        typer.echo(f"service {service.name} running: {running.describe()}; Ctrl-C or SIGTERM stops it", err=True)

    if status_fd is not None:  # a child of `--processes N`: the supervisor serves the health endpoints
        options = RunOptions(grace=grace, give_up_after=give_up_after)
    outcome = _run_service(service, url, options, on_started=started, status_fd=status_fd)
    if outcome.code:
        typer.echo(f"error: service {service.name} stopped: {outcome.reason}", err=True)
        raise typer.Exit(outcome.code)
    typer.echo(f"service {service.name} stopped", err=True)
    raise typer.Exit(0)


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
    from .asyncapi import asyncapi_document, to_json, to_yaml
    from .service import ServiceError, load_service

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
    from .runner import supervise

    outcome = await supervise(argv, processes, stop, env=env, options=options)
    if outcome.code:
        typer.echo(f"error: {outcome.reason}", err=True)
    return outcome.code


dlq_app = typer.Typer(help="Inspect, replay and purge a work queue's dead-lettered tasks.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

outbox_app = typer.Typer(help="Transactional outbox: the relay that publishes committed rows.", no_args_is_help=True)


@outbox_app.command("relay")
def outbox_relay(
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            envvar="AMQPKIT_OUTBOX_DB",
            help="database URL: sqlite:///file.db or postgresql://user@host/db "
            "(give a password through AMQPKIT_OUTBOX_DB: `ps` shows command lines)",
        ),
    ] = None,
    schema: Annotated[str | None, typer.Option("--schema", help="PostgreSQL schema of the outbox tables")] = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="table name prefix (default amqpkit_)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="rows per round")] = 200,
    poll_interval: Annotated[float, typer.Option("--poll-interval", help="seconds between looks when idle")] = 1.0,
    retention: Annotated[float, typer.Option("--retention", help="seconds sent rows are kept")] = 86400.0,
    url: UrlOption = None,
) -> None:
    """Publish committed outbox rows with publisher confirms until SIGTERM or Ctrl-C.

    Exits 0 after a signal, 2 when the database or the broker cannot be reached (one error line).
    """
    from .outbox.relay import main as relay_main

    code = relay_main(
        db, url, schema=schema, prefix=prefix, batch_size=batch_size, poll_interval=poll_interval, retention=retention
    )
    raise typer.Exit(code)


app.add_typer(outbox_app, name="outbox")


def _run_broker_job(url: str | None, job: Any, *, log_level: int = logging.ERROR) -> Any:
    command_logging(log_level)

    async def run() -> Any:
        async with Broker(settings_for(url)) as broker:
            return await job(broker)

    try:
        return asyncio.run(run())
    except ConnectError as exc:
        connect_failed(exc)
    except TopologyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _print_dead_letters(letters: Any, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("#", "task id", "error", "reason", "attempts", "age"):
        table.add_column(col)
    for i, d in enumerate(letters, 1):
        age = "-" if d.age_s is None else f"{d.age_s:,.0f} s"
        table.add_row(str(i), str(d.task_id), d.error[:80], str(d.reason), str(d.attempts), age)
    Console().print(table)


@dlq_app.command("list")
def dlq_list(
    queue: Annotated[str, typer.Argument(help="work queue (its DLQ is QUEUE.dlq)")],
    limit: Annotated[int | None, typer.Option("--limit", help="show at most N (default 1000)")] = None,
    url: UrlOption = None,
) -> None:
    """Show dead-lettered tasks (id, error, attempts, age), leaving the DLQ as it was."""
    from .patterns.dlq import count_dead_letters, list_dead_letters

    async def job(broker: Broker) -> tuple[int, Any]:
        return await count_dead_letters(broker, queue), await list_dead_letters(broker, queue, limit=limit)

    total, letters = _run_broker_job(url, job)
    shown = f"{len(letters)} of {total}" if len(letters) < total else f"{len(letters)}"
    _print_dead_letters(letters, f"{shown} dead-lettered tasks in {queue}.dlq")


@dlq_app.command("replay")
def dlq_replay(
    queue: Annotated[str, typer.Argument(help="work queue (its DLQ is QUEUE.dlq)")],
    limit: Annotated[int | None, typer.Option("--limit", help="replay at most N")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would move; move nothing")] = False,
    url: UrlOption = None,
) -> None:
    """Move dead-lettered tasks back to the work queue (each confirmed there before it leaves the DLQ)."""
    from .patterns.dlq import replay_dead_letters

    letters = _run_broker_job(url, lambda b: replay_dead_letters(b, queue, limit=limit, dry_run=dry_run))
    verb = "would replay" if dry_run else "replayed"
    _print_dead_letters(letters, f"{verb} {len(letters)} tasks to {queue}")


@dlq_app.command("purge")
def dlq_purge(
    queue: Annotated[str, typer.Argument(help="work queue (its DLQ is QUEUE.dlq)")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    url: UrlOption = None,
) -> None:
    """Delete every dead-lettered task of QUEUE (asks first)."""
    from .patterns.dlq import dlq_name, purge_dead_letters

    if not yes:
        typer.confirm(f"Delete every message in {dlq_name(queue)}?", abort=True)
    count = _run_broker_job(url, lambda b: purge_dead_letters(b, queue))
    typer.echo(f"purged {count} messages from {dlq_name(queue)}")


def _headers(pairs: list[str] | None) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"headers are KEY=VALUE, not {pair!r}")
        headers[key] = value
    return headers


def _show(delivery: Any) -> str:
    body = delivery.body
    try:
        shown = body.decode("utf-8")
    except UnicodeDecodeError:
        shown = repr(body)
    return f"[{delivery.exchange or '(default)'} {delivery.routing_key!r} id={delivery.message_id}] {shown}"


@app.command()
def publish(
    body: Annotated[str | None, typer.Argument(help="message body, as UTF-8 text")] = None,
    exchange: Annotated[str, typer.Option("--exchange", "-e", help="exchange ('' is the default exchange)")] = "",
    routing_key: Annotated[str, typer.Option("--routing-key", "-k", help="routing key (a queue name on '')")] = "",
    json_body: Annotated[str | None, typer.Option("--json", help="body as a JSON document instead")] = None,
    header: Annotated[list[str] | None, typer.Option("--header", "-H", help="KEY=VALUE, repeatable")] = None,
    count: Annotated[int, typer.Option("--count", "-n", help="how many copies")] = 1,
    transient: Annotated[bool, typer.Option("--transient", help="delivery mode 1 (not persistent)")] = False,
    mandatory: Annotated[bool, typer.Option("--mandatory", help="fail if no queue takes it")] = False,
    url: UrlOption = None,
) -> None:
    """Publish a message (each one confirmed by the broker)."""
    import json

    from .message import Envelope

    if json_body is not None:
        try:
            payload = json.dumps(json.loads(json_body)).encode()
        except ValueError as exc:
            raise typer.BadParameter(f"--json is not valid JSON: {exc}") from None
        content_type = "application/json"
    elif body is not None:
        payload, content_type = body.encode(), "text/plain; charset=utf-8"
    else:
        raise typer.BadParameter("give a BODY or --json")
    headers = _headers(header)

    async def job(broker: Broker) -> int:
        for _ in range(count):
            envelope = Envelope(payload, content_type=content_type, headers=dict(headers), persistent=not transient)
            await broker.publish(envelope, exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        return count

    try:
        sent = _run_broker_job(url, job)
    except PublishError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"published {sent} message(s) to {exchange or '(default exchange)'!r} with key {routing_key!r}, confirmed"
    )


@app.command()
def consume(
    queue: Annotated[str | None, typer.Option("--queue", "-q", help="consume this queue (messages are acked)")] = None,
    exchange: Annotated[str | None, typer.Option("--exchange", "-e", help="or bind a private queue to this")] = None,
    binding: Annotated[list[str] | None, typer.Option("--binding", "-b", help="binding key, repeatable")] = None,
    exchange_type: Annotated[str, typer.Option("--exchange-type", help="type of --exchange")] = "topic",
    count: Annotated[int | None, typer.Option("--count", "-n", help="stop after N messages")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="stop after S seconds")] = None,
    url: UrlOption = None,
) -> None:
    """Print the messages of a queue, or of an exchange through a private queue, one line each."""
    from .topology import Binding, Exchange, ExchangeType, Queue

    if (queue is None) == (exchange is None):
        raise typer.BadParameter("give --queue or --exchange (with --binding)")

    async def job(broker: Broker) -> int:
        done = asyncio.Event()
        seen = 0

        async def show(delivery: Any) -> None:
            nonlocal seen
            if count is not None and seen >= count:
                await delivery.nack(requeue=True)
                return
            seen += 1
            typer.echo(_show(delivery))
            await delivery.ack()
            if count is not None and seen >= count:
                done.set()

        if queue is not None:
            # Someone else's queue: consumed as it is, never declared with a spec of ours.
            consumer = await broker.consume(Queue(queue), show, prefetch=count or 100, declare=False)
        else:
            assert exchange is not None
            private = Queue(exclusive=True, auto_delete=True, durable=False)
            spec = Exchange(exchange, type=ExchangeType(exchange_type))
            for key in binding or ["#"]:
                await broker.bind(Binding(spec, private, routing_key=key))
            consumer = await broker.consume(private, show, prefetch=count or 100)
        typer.echo(f"consuming from {queue or exchange!r}; Ctrl-C stops", err=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await done.wait()
        await consumer.cancel()
        return seen

    try:
        seen = _run_broker_job(url, job, log_level=logging.WARNING)  # a reconnect is worth a line
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    typer.echo(f"{seen} message(s)", err=True)


@app.command()
def call(
    queue: Annotated[str, typer.Argument(help="the server's request queue")],
    method: Annotated[str, typer.Argument(help="method name ('-' for none, as the tutorial's server takes)")],
    payload: Annotated[str, typer.Argument(help="request as JSON")] = "null",
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for the reply")] = 10.0,
    url: UrlOption = None,
) -> None:
    """Call an RPC method and print the reply (or the remote error, exit 1)."""
    import json

    from .patterns.rpc import RpcClient

    try:
        request = json.loads(payload)
    except ValueError as exc:
        raise typer.BadParameter(f"PAYLOAD is not valid JSON: {exc}") from None

    async def job(broker: Broker) -> Any:
        async with RpcClient(broker, queue, timeout=timeout) as client:
            return await client.call(None if method == "-" else method, request)

    try:
        reply = _run_broker_job(url, job)
    except RpcError as exc:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(reply if isinstance(reply, str) else json.dumps(reply))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
