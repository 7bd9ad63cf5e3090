"""``amqpkit dlq``: list, replay and purge a work queue's dead-lettered tasks."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..connection import Broker
from . import UrlOption, app, run_broker_job

dlq_app = typer.Typer(help="Inspect, replay and purge a work queue's dead-lettered tasks.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


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
    limit: Annotated[int | None, typer.Option("--limit", min=0, help="show at most N (default 1000)")] = None,
    url: UrlOption = None,
) -> None:
    """Show dead-lettered tasks (id, error, attempts, age), leaving the DLQ as it was."""
    from ..patterns.dlq import count_dead_letters, list_dead_letters

    async def job(broker: Broker) -> tuple[int, Any]:
        return await count_dead_letters(broker, queue), await list_dead_letters(broker, queue, limit=limit)

    total, letters = run_broker_job(url, job)
    shown = f"{len(letters)} of {total}" if len(letters) < total else f"{len(letters)}"
    _print_dead_letters(letters, f"{shown} dead-lettered tasks in {queue}.dlq")


@dlq_app.command("replay")
def dlq_replay(
    queue: Annotated[str, typer.Argument(help="work queue (its DLQ is QUEUE.dlq)")],
    limit: Annotated[int | None, typer.Option("--limit", min=0, help="replay at most N")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would move; move nothing")] = False,
    url: UrlOption = None,
) -> None:
    """Move dead-lettered tasks back to the work queue (each confirmed there before it leaves the DLQ)."""
    from ..patterns.dlq import replay_dead_letters

    letters = run_broker_job(url, lambda b: replay_dead_letters(b, queue, limit=limit, dry_run=dry_run))
    verb = "would replay" if dry_run else "replayed"
    _print_dead_letters(letters, f"{verb} {len(letters)} tasks to {queue}")


@dlq_app.command("purge")
def dlq_purge(
    queue: Annotated[str, typer.Argument(help="work queue (its DLQ is QUEUE.dlq)")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    url: UrlOption = None,
) -> None:
    """Delete every dead-lettered task of QUEUE (asks first)."""
    from ..patterns.dlq import dlq_name, purge_dead_letters

    if not yes:
        typer.confirm(f"Delete every message in {dlq_name(queue)}?", abort=True)
    count = run_broker_job(url, lambda b: purge_dead_letters(b, queue))
    typer.echo(f"purged {count} messages from {dlq_name(queue)}")
