"""Fixtures for the outbox and inbox: a store on each backend, with tables of the test's own.

SQLite: a file in the test's tmp_path. PostgreSQL: ``POSTGRES_URL`` when set, else the local server
(127.0.0.1:5432, database ``test``, trust auth, as scripts/ensure_postgres.sh sets up); each test gets
a schema of its own, dropped at the end. No PostgreSQL answering fails the run: it never skips.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from amqpkit.outbox import PostgresStore, SqliteStore, Store

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
HOW_TO_START = (
    "No PostgreSQL answered at {url}. Set POSTGRES_URL, or run `bash scripts/ensure_postgres.sh` "
    "(starts the local server, or installs Debian's postgresql when root)."
)


def postgres_url() -> str:
    return os.environ.get("POSTGRES_URL") or LOCAL_POSTGRES


@pytest.fixture(scope="session")
def pg_url() -> str:
    return postgres_url()


async def _check_postgres(url: str) -> None:
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except Exception as exc:
        pytest.fail(f"{HOW_TO_START.format(url=url.split('@')[-1])} ({type(exc).__name__}: {exc})", pytrace=False)
    await conn.close()


@pytest.fixture
async def pg_schema(pg_url: str) -> AsyncIterator[str]:
    """A schema of this test's own (dropped with everything in it at the end)."""
    await _check_postgres(pg_url)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield schema
    finally:
        conn = await asyncpg.connect(pg_url, timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def make_store(kind: str, tmp_path: Path, pg_url: str, schema: str, **options: object) -> Store:
    if kind == "sqlite":
        return SqliteStore(tmp_path / "outbox.db", **options)  # type: ignore[arg-type]
    return PostgresStore(pg_url, schema=schema, **options)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(backend: str, tmp_path: Path, pg_url: str, pg_schema: str) -> AsyncIterator[Store]:
    """An open store with its tables, on each backend."""
    s = make_store(backend, tmp_path, pg_url, pg_schema)
    await s.open()
    try:
        await s.create_tables()
        yield s
    finally:
        await s.close()
