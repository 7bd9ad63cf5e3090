"""The ``amqpkit`` command line. Thin: it parses, calls the library, prints.

This module holds the app, the options and helpers the commands share, and ``check``;
the commands live by concern in :mod:`.bench`, :mod:`.services` (worker, run, asyncapi),
:mod:`.messages` (publish, consume, call), :mod:`.dlq` and :mod:`.outbox`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Annotated, Any, NoReturn

import typer

from .._version import __version__
from ..connection import Broker
from ..errors import ConnectError, TopologyError
from ..logs import configure_logging
from ..settings import BrokerSettings

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
LIMIT_HINT = (
    "another connection of this user or vhost must close first, or the limit be raised "
    "(rabbitmqctl list_user_limits, list_vhost_limits -p VHOST)"
)


def connect_failed(exc: ConnectError, *, unreachable: str = "") -> NoReturn:
    """Say why the connection failed, with the hint that fits the cause; exit 2.

    ``unreachable`` goes before the text when no broker answered.
    """
    if exc.reason == "refused":
        typer.echo(f"error: {exc}; {CREDENTIALS_HINT}", err=True)
    elif exc.reason == "limit":
        typer.echo(f"error: {exc}; {LIMIT_HINT}", err=True)
    else:
        typer.echo(f"error: {unreachable}{exc}; {BROKER_HINT}", err=True)
    raise typer.Exit(2) from None


def positive_seconds(value: float | None, option: str) -> None:
    """A usage error for ``option`` given as a number of seconds that is not more than 0 (nan too); None passes."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"seconds, more than 0, not {value:g}", param_hint=option)


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


def run_broker_job(url: str | None, job: Any, *, log_level: int = logging.ERROR) -> Any:
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


def main() -> None:
    app()


# The commands, registered on `app` in the order `amqpkit --help` lists them.
from . import bench, services, messages, dlq, outbox  # noqa: E402, F401, I001
