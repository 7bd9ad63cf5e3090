"""``amqpkit bench``: the benchmark's options, its progress bars and its report."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..bench.run import DEFAULT_SCENARIOS
from ..errors import ConnectError
from . import UrlOption, app, command_logging, connect_failed, settings_for

if TYPE_CHECKING:
    from rich.progress import TaskID


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
    paired: Annotated[
        bool,
        typer.Option("--paired", help="at one call in flight, alternate the scenarios' calls one by one (calls only)"),
    ] = False,
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

    from ..bench import BenchParams, MissingDependency, run_loops
    from ..bench.burst import parse_profile
    from ..bench.compare import parse_target
    from ..bench.report import plot, print_report

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
            paired=paired,
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
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["loc"]:  # a field's own bound: named as its option (a check across fields names them itself)
            message = f"--{str(first['loc'][0]).replace('_', '-')}: {message}"
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
