"""The ``amqpkit`` command line. Thin: it parses, calls the library, prints."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from ._version import __version__
from .connection import Broker
from .errors import ConnectError
from .settings import BrokerSettings

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


def main() -> None:
    app()
