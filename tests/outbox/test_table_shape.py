"""Outbox and inbox tables made beforehand (a migration tool, an older release): used when they fit, refused
with a StorageError naming what is wrong when they do not, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from amqpkit import Delivery, Envelope
from amqpkit.outbox import Inbox, PostgresStore, StorageError, Store, open_store

from .conftest import make_store

INBOX_WITHOUT_KEY = (  # an ORM's surrogate key, and no unique key on (consumer, message_id)
    "CREATE TABLE {t}inbox (id {serial} PRIMARY KEY, consumer TEXT NOT NULL, message_id TEXT NOT NULL,"
    " processed_at {stamp} NOT NULL, reply {blob}, reply_content_type TEXT)"
)
INBOX_WITH_INDEX_ONLY = (
    "CREATE TABLE {t}inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL, processed_at {stamp} NOT NULL,"
    " reply {blob}, reply_content_type TEXT); CREATE INDEX {p}inbox_ids ON {t}inbox (consumer, message_id)"
)
OUTBOX_OLDER = (  # no next_attempt_at
    "CREATE TABLE {t}outbox (id {serial} PRIMARY KEY, message_id TEXT NOT NULL, exchange TEXT NOT NULL,"
    " routing_key TEXT NOT NULL, ordering_key TEXT, body {blob} NOT NULL, content_type TEXT, headers TEXT,"
    " properties TEXT, mandatory BOOLEAN NOT NULL DEFAULT true, state SMALLINT NOT NULL DEFAULT 0,"
    " attempts INTEGER NOT NULL DEFAULT 0, created_at {stamp} NOT NULL, sent_at {stamp}, last_error TEXT)"
)


async def made_beforehand(backend: str, tmp_path: Path, pg_url: str, pg_schema: str, ddl: str) -> Store:
    store = make_store(backend, tmp_path, pg_url, pg_schema)
    await store.open()
    if isinstance(store, PostgresStore):
        words = {"t": f'"{pg_schema}".amqpkit_', "p": "amqpkit_", "stamp": "timestamptz DEFAULT now()",
                 "blob": "bytea", "serial": "bigserial"}  # fmt: skip
        async with store.transaction() as tx:
            await tx.execute(f'CREATE SCHEMA "{pg_schema}"')
            await tx.execute(ddl.format(**words))
    else:
        words = {"t": "amqpkit_", "p": "amqpkit_", "stamp": "REAL", "blob": "BLOB", "serial": "INTEGER"}
        async with store.transaction() as tx:
            for statement in ddl.format(**words).split(";"):
                await tx.execute(statement)
    return store


@pytest.mark.parametrize(
    ("ddl", "named"),
    [
        (INBOX_WITHOUT_KEY, r"amqpkit_inbox has no unique key on \(consumer, message_id\)"),
        (INBOX_WITH_INDEX_ONLY, r"amqpkit_inbox has no unique key on \(consumer, message_id\)"),
        (OUTBOX_OLDER, r"amqpkit_outbox has no column next_attempt_at"),
    ],
    ids=["inbox with a surrogate key", "inbox with a plain index", "outbox without next_attempt_at"],
)
async def test_tables_that_do_not_fit_are_refused_when_created(
    backend: str, tmp_path: Path, pg_url: str, pg_schema: str, ddl: str, named: str
) -> None:
    store = await made_beforehand(backend, tmp_path, pg_url, pg_schema, ddl)
    try:
        with pytest.raises(StorageError, match=named):
            await store.create_tables()
    finally:
        await store.close()


async def test_an_inbox_without_its_key_fails_loudly_instead_of_running_every_repeat(
    backend: str, tmp_path: Path, pg_url: str, pg_schema: str
) -> None:
    """Used without create_tables (open_store(create=False)): the record fails, the handler is not run, and
    the same message is never processed three times."""
    store = await made_beforehand(backend, tmp_path, pg_url, pg_schema, INBOX_WITHOUT_KEY)
    runs: list[str] = []

    async def note(d: Delivery[bytes], tx: Any) -> None:
        runs.append(d.message_id or "")

    try:
        inbox = Inbox(store, consumer="billing")
        for _ in range(3):
            with pytest.raises(Exception, match="ON CONFLICT"):
                await inbox.process(Delivery(b"x", b"x", Envelope(b"x", message_id="m-1").properties()), note)
        assert runs == []
    finally:
        await store.close()


def store_url(backend: str, tmp_path: Path, pg_url: str, pg_schema: str) -> tuple[str, dict[str, Any]]:
    """The URL and options open_store takes for the store make_store makes."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.db'}", {}
    return pg_url, {"schema": pg_schema}


@pytest.mark.parametrize(
    ("ddl", "named", "missing"),
    [
        (INBOX_WITHOUT_KEY, r"amqpkit_inbox has no unique key on \(consumer, message_id\)", "amqpkit_outbox"),
        (OUTBOX_OLDER, r"amqpkit_outbox has no column next_attempt_at", "amqpkit_inbox"),
    ],
    ids=["inbox with a surrogate key", "outbox without next_attempt_at"],
)
async def test_open_store_without_create_checks_the_tables_it_is_given(
    backend: str, tmp_path: Path, pg_url: str, pg_schema: str, ddl: str, named: str, missing: str
) -> None:
    """open_store(create=False) is how tables a migration tool makes are used: the very tables the check is for.
    It opened an inbox without its unique key without a word (whose every record then failed)."""
    store = await made_beforehand(backend, tmp_path, pg_url, pg_schema, ddl)
    await store.close()
    url, options = store_url(backend, tmp_path, pg_url, pg_schema)
    with pytest.raises(StorageError, match=named) as refused:
        await (await open_store(url, create=False, **options)).close()
    assert f"{missing} does not exist" in str(refused.value)


async def test_open_store_without_create_opens_tables_that_fit_and_names_missing_ones(
    backend: str, tmp_path: Path, pg_url: str, pg_schema: str
) -> None:
    url, options = store_url(backend, tmp_path, pg_url, pg_schema)
    with pytest.raises(StorageError, match=r"amqpkit_outbox does not exist.*create_tables"):
        await (await open_store(url, create=False, **options)).close()
    await (await open_store(url, **options)).close()  # made as amqpkit makes them
    store = await open_store(url, create=False, **options)
    await store.close()


async def test_postgresql_column_of_another_type_is_named(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    ddl = OUTBOX_OLDER.replace("state SMALLINT NOT NULL DEFAULT 0", "state TEXT NOT NULL DEFAULT 'pending'").replace(
        "last_error TEXT", "last_error TEXT, next_attempt_at timestamptz NOT NULL DEFAULT '-infinity'"
    )
    store = await made_beforehand("postgresql", tmp_path, pg_url, pg_schema, ddl)
    try:
        with pytest.raises(StorageError, match=r"amqpkit_outbox.state is text, not int2 or int4 or int8"):
            await store.create_tables()
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("ddl", "fits"),
    [
        (  # a unique index with an INCLUDE column: its key is still (consumer, message_id)
            "CREATE TABLE {t}inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL, processed_at {stamp} NOT NULL,"
            " reply {blob}, reply_content_type TEXT);"
            " CREATE UNIQUE INDEX {p}inbox_key ON {t}inbox (consumer, message_id) INCLUDE (processed_at)",
            True,
        ),
        (  # text columns through a domain, and a domain over a domain
            "CREATE DOMAIN {t}id_text AS text; CREATE DOMAIN {t}id_text2 AS {t}id_text;"
            " CREATE TABLE {t}inbox (consumer {t}id_text NOT NULL,"
            " message_id {t}id_text2 NOT NULL, processed_at {stamp} NOT NULL, reply {blob},"
            " reply_content_type varchar(200), PRIMARY KEY (consumer, message_id))",
            True,
        ),
        (  # a case-insensitive key: ids that differ in case would be taken as one, the second never run
            "CREATE COLLATION {t}ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);"
            " CREATE TABLE {t}inbox (consumer TEXT NOT NULL, message_id TEXT COLLATE {t}ci NOT NULL,"
            " processed_at {stamp} NOT NULL, reply {blob}, reply_content_type TEXT,"
            " PRIMARY KEY (consumer, message_id))",
            False,
        ),
        (  # a deferrable key: ON CONFLICT cannot use it
            "CREATE TABLE {t}inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL, processed_at {stamp} NOT NULL,"
            " reply {blob}, reply_content_type TEXT,"
            " CONSTRAINT {p}inbox_key UNIQUE (consumer, message_id) DEFERRABLE INITIALLY DEFERRED)",
            False,
        ),
    ],
    ids=["unique index with INCLUDE", "domains", "case-insensitive key", "deferrable unique key"],
)
async def test_postgresql_keys_and_types_that_fit_are_taken(
    tmp_path: Path, pg_url: str, pg_schema: str, ddl: str, fits: bool
) -> None:
    """Reviews: the check refused a unique index with INCLUDE columns and text through a domain (or a domain over
    one), took a deferrable key that ON CONFLICT then refused on every record, and took a case-insensitive key
    (citext, or a nondeterministic collation) that let a new message pass as a duplicate and never run."""
    store = await made_beforehand("postgresql", tmp_path, pg_url, pg_schema, ddl)
    try:
        if fits:
            await store.create_tables()
        else:
            with pytest.raises(StorageError, match=r"no unique key|nondeterministic collation"):
                await store.create_tables()
    finally:
        await store.close()
