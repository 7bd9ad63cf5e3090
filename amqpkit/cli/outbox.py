"""``amqpkit outbox relay``: the transactional outbox's relay process."""

from __future__ import annotations

from typing import Annotated

import typer

from . import UrlOption, app, positive_seconds

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
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="rows per round")] = 200,
    poll_interval: Annotated[float, typer.Option("--poll-interval", help="seconds between looks when idle")] = 1.0,
    retention: Annotated[float, typer.Option("--retention", min=0, help="seconds sent rows are kept")] = 86400.0,
    url: UrlOption = None,
) -> None:
    """Publish committed outbox rows with publisher confirms until SIGTERM or Ctrl-C.

    Exits 0 after a signal, 2 when the database or the broker cannot be reached (one error line).
    """
    positive_seconds(poll_interval, "--poll-interval")  # 0 looked again at once, for ever: a busy loop on the database
    from ..outbox.relay import main as relay_main

    code = relay_main(
        db, url, schema=schema, prefix=prefix, batch_size=batch_size, poll_interval=poll_interval, retention=retention
    )
    raise typer.Exit(code)


app.add_typer(outbox_app, name="outbox")
