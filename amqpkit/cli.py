"""The ``amqpkit`` command line. Thin: it parses, calls the library, prints."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ._version import __version__
from .bench.run import DEFAULT_SCENARIOS
from .connection import Broker
from .errors import ConnectError
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
        "--url", envvar="AMQP_URL", help="AMQP URL (default: AMQP_URL, else amqp://guest:guest@127.0.0.1:5672/)"
    ),
]

BROKER_HINT = (
    "start one with `rabbitmq-server -detached` (Debian: apt-get install rabbitmq-server), "
    "or `docker compose up -d` from the amqpkit checkout, or point AMQP_URL at yours"
)


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

    async def run() -> tuple[str, str]:
        settings = settings_for(url).model_copy(
            update={"reconnect": BrokerSettings().reconnect.model_copy(update={"connect_attempts": 1})}
        )
        async with Broker(settings) as broker:
            return broker.server_product

    try:
        product, version = asyncio.run(run())
    except ConnectError as exc:
        typer.echo(f"error: {exc}; {BROKER_HINT}", err=True)
        raise typer.Exit(2) from None
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
            help="comma-separated: rpc, rpc-reply-queue, oneway, oneway-confirmed, raw-rpc, raw-oneway, aiopika-rpc",
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
    repeat: Annotated[int, typer.Option("--repeat", help="runs of the whole sweep, interleaved; shows the spread")] = 1,
    json_path: Annotated[str | None, typer.Option("--json", help="write results as JSON to PATH ('-': stdout)")] = None,
    plot_path: Annotated[str | None, typer.Option("--plot", help="draw latency against throughput to PATH.png")] = None,
    stall_ms: Annotated[int, typer.Option("--stall-ms", hidden=True)] = 0,
    stall_after: Annotated[int, typer.Option("--stall-after", hidden=True)] = 0,
) -> None:
    """Measure RPC against one-way messaging on a real broker: latency percentiles and throughput."""
    import logging

    from pydantic import ValidationError
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .bench import BenchParams, run_bench
    from .bench.report import plot, print_report

    logging.basicConfig(level=logging.CRITICAL)
    settings = settings_for(url)
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
            stall_ms=stall_ms,
            stall_after=stall_after,
        )
    except ValidationError as exc:
        typer.echo(f"error: {exc.errors()[0]['msg']}", err=True)
        raise typer.Exit(2) from None
    to_stdout = json_path == "-"
    console = Console(stderr=to_stdout)
    if not console.is_terminal:
        console.width = max(console.width, 132)
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
            result = asyncio.run(run_bench(params, on_progress=on_progress))
    except ConnectError as exc:
        typer.echo(f"error: no broker: {exc}; {BROKER_HINT}", err=True)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
