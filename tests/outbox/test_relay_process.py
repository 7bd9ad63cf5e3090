"""The relay as a process of its own (python -m amqpkit.outbox relay), and databases that do not answer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from amqpkit import Broker, Queue
from amqpkit.outbox import Outbox, StorageUnreachable, open_store

from .. import processes
from ..waiting import until


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("postgresql://app:s3cr3t-pw@127.0.0.1:1/test", "127.0.0.1:1"),
        ("postgresql://app:s3cr3t-pw@no-such-host.invalid:6543/test", "no-such-host.invalid:6543"),
    ],
)
async def test_unreachable_postgres_names_host_and_port_without_the_password(url: str, target: str) -> None:
    with pytest.raises(StorageUnreachable) as caught:
        await open_store(url, connect_timeout=5)
    text = str(caught.value)
    assert target in text and "s3cr3t-pw" not in text
    assert caught.value.target == target
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


async def test_wrong_password_says_so_without_the_password(pg_url: str) -> None:
    """Trust auth takes any password, so a user that does not exist stands in for a refused login."""
    url = "postgresql://no_such_user_x:s3cr3t-pw@" + pg_url.split("@", 1)[1]
    with pytest.raises(StorageUnreachable) as caught:
        await open_store(url, connect_timeout=5)
    assert "s3cr3t-pw" not in str(caught.value)


async def test_sqlite_file_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    path = tmp_path / "missing-folder" / "app.db"
    with pytest.raises(StorageUnreachable) as caught:
        await open_store(f"sqlite:///{path}")
    assert str(path) in str(caught.value)


def relay_argv(db_url: str) -> list[str]:
    return [sys.executable, "-m", "amqpkit.outbox", "relay", "--db", db_url, "--poll-interval", "0.2"]


async def test_relay_process_publishes_and_stops_on_sigterm(
    spawned: None, backend: str, tmp_path: Path, pg_url: str, pg_schema: str, amqp_url: str, broker: Broker, name: str
) -> None:
    if backend == "sqlite":
        options: dict[str, Any]
        db_url, options, extra = f"sqlite:///{tmp_path / 'app.db'}", {}, []
    else:
        db_url, options, extra = pg_url, {"schema": pg_schema}, ["--schema", pg_schema]
    store = await open_store(db_url, **options)
    queue = Queue(f"{name}.events")
    await broker.declare_queue(queue)
    try:
        outbox = Outbox(store)
        async with store.transaction() as tx:
            for i in range(20):
                await outbox.add(tx, str(i).encode(), routing_key=queue.name, ordering_key="k")
        env = {**os.environ, "AMQP_URL": amqp_url}
        proc = await processes.spawn(
            *relay_argv(db_url), *extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

        async def all_there() -> bool:
            return (await broker.queue_counts(queue.name))[0] >= 20

        await until(all_there, timeout=30)
        await processes.end(proc, grace=15)
        assert proc.returncode == 0
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert "20 sent" in err
        assert await store.counts() == {"pending": 0, "sent": 20, "failed": 0}
    finally:
        await store.close()
        await broker.delete_queue(queue.name)


async def test_relay_process_with_an_unreachable_database_exits_2_with_one_error_line(spawned: None) -> None:
    env = {**os.environ, "AMQPKIT_OUTBOX_DB": "postgresql://app:s3cr3t-pw@127.0.0.1:1/test"}
    proc = await processes.spawn(
        sys.executable, "-m", "amqpkit.outbox", "relay", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 2
    assert "127.0.0.1:1" in text and "s3cr3t-pw" not in text and "Traceback" not in text
