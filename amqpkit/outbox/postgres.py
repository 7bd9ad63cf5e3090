"""PostgreSQL backend (asyncpg), for production.

Why asyncpg rather than psycopg 3: it speaks the wire protocol itself (no
libpq to install), is the faster of the two on small statements, and its
``add_listener`` hands LISTEN/NOTIFY to asyncio directly, which is what the
relay's wake-up needs.

- **Several relays** claim rows with ``SELECT ... FOR UPDATE SKIP LOCKED`` and
  keep the row locks until the broker has confirmed and the rows are marked:
  a relay that dies loses its connection, PostgreSQL rolls its transaction
  back, and another relay takes the rows (sending them again, with the same
  message ids). No two relays ever hold the same row.
- **Commit order per ordering key**: :meth:`add` takes a transaction-level
  advisory lock on the key before the row gets its id, so two transactions
  with the same key commit one after the other and their ids follow commit
  order. A claim hands out a row only if no earlier pending row with its key
  is outside the claim (held by another relay, or waiting for a retry).
- **Wake-up**: :meth:`add` sends ``NOTIFY`` in the same statement (delivered
  at commit); the relay LISTENs on a connection of its own and polls too.
"""

# Table names in the SQL below come from check_name() (letters, digits, "_"); every value is a parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import zlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from .storage import (
    FAILED,
    PENDING,
    ROW_COLUMNS,
    SENT,
    Claim,
    FailedRow,
    InboxRecord,
    OutboxRow,
    StorageError,
    StorageUnreachable,
    check_name,
    db_host_port,
    redact_db_url,
    refuse_misfits,
)

__all__ = ["PostgresStore"]

log = logging.getLogger("amqpkit.outbox")

# Errors that mean "the database was not reachable or the connection broke": worth trying again.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    # A DBA's lock_timeout (55P03) or statement_timeout (57014) ran out, most often waiting for a row another
    # transaction holds: nothing was committed. Not transient, the inbox's Subscriber dropped the message.
    asyncpg.LockNotAvailableError,
    asyncpg.QueryCanceledError,
    # The server ended the session (57P01 a fast shutdown or pg_terminate_backend, 57P02 a crash): nothing
    # committed. asyncpg may instead say InternalClientError ("cannot switch to state ...; another operation
    # is in progress") when the end meets a query in flight. The Subscriber dropped those messages too.
    asyncpg.OperatorInterventionError,
    asyncpg.InternalClientError,
    # 25006: a primary that came back as a standby after a failover refuses every write until it is one again.
    asyncpg.ReadOnlySQLTransactionError,
)


class PostgresStore:
    """Outbox and inbox tables in a PostgreSQL database, through an asyncpg pool.

    ``schema`` puts the tables in that schema (created if missing);
    ``prefix`` starts their names. The NOTIFY channel is named after the
    outbox table.
    """

    name = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "amqpkit_",
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        notify: bool = True,
    ) -> None:
        self.url = url
        self.prefix = check_name(prefix, "table prefix")
        self.schema = check_name(schema, "schema") if schema else None
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.notify = notify
        self.target = db_host_port(url)
        self.description = f"PostgreSQL {redact_db_url(url)}"
        qualify = f'"{self.schema}".' if self.schema else ""
        self.outbox_table = f"{qualify}{prefix}outbox"
        self.inbox_table = f"{qualify}{prefix}inbox"
        self.channel = f"{self.schema + '.' if self.schema else ''}{prefix}outbox"
        self._key_seed = zlib.crc32(self.outbox_table.encode())
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._new_rows = asyncio.Event()

    def __repr__(self) -> str:
        return f"<PostgresStore {redact_db_url(self.url)} table={self.outbox_table!r}>"

    # ------------------------------------------------------------ connection

    async def _connect_error(self, exc: BaseException) -> StorageUnreachable:
        if isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
            reason = "login refused (check user and password)"
        elif isinstance(exc, asyncpg.InvalidCatalogNameError):
            reason = "no such database"
        elif isinstance(exc, TimeoutError):
            reason = f"no answer within {self.connect_timeout:g} s"
        elif isinstance(exc, socket.gaierror):
            reason = "host name not found"
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = f"{type(exc).__name__}: {exc}"
        password = _password(self.url)
        if password:
            reason = reason.replace(password, "***")
        return StorageUnreachable(f"cannot connect to PostgreSQL at {self.target}: {reason}", target=self.target)

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=self.min_size, max_size=self.max_size, timeout=self.connect_timeout
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            raise await self._connect_error(exc) from None

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), 5)
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, Exception):
                pool.terminate()

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError(f"{self.description} is not open; call open() first")
        return self._pool

    def transient(self, exc: BaseException) -> bool:
        return isinstance(exc, _TRANSIENT)

    async def create_tables(self) -> None:
        o, i, p = self.outbox_table, self.inbox_table, self.prefix
        async with self.transaction() as tx:
            # Several processes may start at once: one creates, the others wait and find it done.
            await tx.execute("SELECT pg_advisory_xact_lock($1)", self._key_seed)
            if self.schema:
                await tx.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await tx.execute(
                f"""CREATE TABLE IF NOT EXISTS {o} (
                    id bigserial PRIMARY KEY,
                    message_id text NOT NULL,
                    exchange text NOT NULL,
                    routing_key text NOT NULL,
                    ordering_key text,
                    body bytea NOT NULL,
                    content_type text,
                    headers text,
                    properties text,
                    mandatory boolean NOT NULL DEFAULT true,
                    state smallint NOT NULL DEFAULT {PENDING},
                    attempts integer NOT NULL DEFAULT 0,
                    created_at timestamptz NOT NULL DEFAULT now(),
                    next_attempt_at timestamptz NOT NULL DEFAULT '-infinity',
                    sent_at timestamptz,
                    last_error text)"""
            )
            await tx.execute(
                f"""CREATE TABLE IF NOT EXISTS {i} (
                    consumer text NOT NULL,
                    message_id text NOT NULL,
                    processed_at timestamptz NOT NULL DEFAULT now(),
                    reply bytea,
                    reply_content_type text,
                    PRIMARY KEY (consumer, message_id))"""
            )
            # Tables made beforehand (by a migration tool, an older release) are used as they are: check them.
            refuse_misfits(await self._misfits(tx))
            await tx.execute(f"CREATE INDEX IF NOT EXISTS {p}outbox_pending ON {o} (id) WHERE state = {PENDING}")
            await tx.execute(
                f"CREATE INDEX IF NOT EXISTS {p}outbox_key ON {o} (ordering_key, id) WHERE state = {PENDING}"
            )
            await tx.execute(f"CREATE INDEX IF NOT EXISTS {p}outbox_sent ON {o} (sent_at) WHERE state = {SENT}")
            await tx.execute(f"CREATE INDEX IF NOT EXISTS {p}inbox_age ON {i} (processed_at)")

    async def check_tables(self) -> None:
        """Check tables made elsewhere (a migration tool) as :meth:`create_tables` checks them, creating nothing.

        :class:`StorageError` names each table missing and each way one does not fit.
        """
        async with self.transaction() as tx:
            refuse_misfits(await self._misfits(tx))

    async def _misfits(self, tx: asyncpg.Connection) -> list[str]:
        problems: list[str] = []
        for table, shape, unique in (
            (self.outbox_table, _OUTBOX_SHAPE, ()),
            (self.inbox_table, _INBOX_SHAPE, ("consumer", "message_id")),
        ):
            if await tx.fetchval("SELECT to_regclass($1)", table) is None:
                problems.append(f"{table} does not exist")
            else:
                problems += await _shape_problems(tx, table, shape, unique)
        return problems

    async def drop_tables(self) -> None:
        async with self.transaction() as tx:
            await tx.execute(f"DROP TABLE IF EXISTS {self.outbox_table}")
            await tx.execute(f"DROP TABLE IF EXISTS {self.inbox_table}")

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._connection() as conn, conn.transaction():
            yield conn
            await _committable(conn)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the pool, given back at the end. The pool resets a connection it is given back, one more
        query: when the server ends the session then, that error comes after the block's COMMIT returned, and
        raised it told a writer whose change had committed that it failed (it wrote it again: a second effect, a
        second event under a new message id). What the block did is settled by then; the pool lets that
        connection go either way, so its error is only logged."""
        conn = await self.pool.acquire()
        try:
            yield conn
        finally:
            try:
                await self.pool.release(conn)
            except Exception as exc:
                log.debug("a connection the database ended after its work was let go (%s: %s)",
                          type(exc).__name__, exc)  # fmt: skip

    def in_transaction(self, tx: Any) -> bool:
        return isinstance(tx, asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) and bool(tx.is_in_transaction())

    # ------------------------------------------------------------ outbox

    async def add(self, tx: Any, row: dict[str, Any]) -> None:
        values = (
            row["message_id"], row["exchange"], row["routing_key"], row["ordering_key"], row["body"],
            row["content_type"], row["headers"], row["properties"], bool(row["mandatory"]),
        )  # fmt: skip
        columns = "message_id, exchange, routing_key, ordering_key, body, content_type, headers, properties, mandatory"
        params = "$1, $2, $3, $4, $5, $6, $7, $8, $9"
        notify = "SELECT pg_notify($10, '') FROM ins" if self.notify else "SELECT 1 FROM ins"
        if row["ordering_key"] is not None:
            # The key's lock is taken before the row's id is drawn, and held to commit.
            sql = (
                f"WITH l AS MATERIALIZED (SELECT pg_advisory_xact_lock(hashtextextended($4, {self._key_seed}))),"
                f" ins AS (INSERT INTO {self.outbox_table} ({columns}) SELECT {params} FROM l RETURNING id) {notify}"
            )
        else:
            sql = f"WITH ins AS (INSERT INTO {self.outbox_table} ({columns}) VALUES ({params}) RETURNING id) {notify}"
        if self.notify:
            await tx.execute(sql, *values, self.channel)
        else:
            await tx.execute(sql, *values)

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[Claim]:
        async with self._connection() as conn:
            try:
                async with conn.transaction():
                    claim = await self._take(conn, limit)
                    yield claim
                    await self._settle(conn, claim)
            except (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError) as exc:
                if not _closed(conn):
                    raise
                raise StorageError(
                    f"the database ended the relay's transaction while it published a batch ({type(exc).__name__}: "
                    f"{exc}); its rows stay pending and are sent again, with the same message ids. A server-side "
                    "limit (transaction_timeout), pg_terminate_backend or a restart ends it"
                ) from exc

    async def _take(self, conn: asyncpg.Connection, limit: int) -> Claim:
        o = self.outbox_table
        # The claim's transaction stays open, idle, while the batch is published and confirmed: an operator's
        # idle_in_transaction_session_timeout ended it before the rows were marked, and every round sent the
        # batch again. Off for this transaction only.
        await conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
        # A key whose earlier row waits for a retry is left out here, not after the LIMIT: a batch's
        # worth of its rows at the head would fill every batch, and no other row would ever go.
        records = await conn.fetch(
            f"SELECT {ROW_COLUMNS} FROM {o} AS r WHERE r.state = {PENDING} AND r.next_attempt_at <= now()"
            f" AND NOT EXISTS (SELECT 1 FROM {o} AS e WHERE e.state = {PENDING}"
            " AND e.ordering_key = r.ordering_key AND e.id < r.id AND e.next_attempt_at > now())"
            " ORDER BY r.id LIMIT $1 FOR UPDATE OF r SKIP LOCKED",
            limit,
        )
        rows = [OutboxRow.from_db(tuple(r)) for r in records]
        keys = list({r.ordering_key for r in rows if r.ordering_key is not None})
        if keys:
            # An earlier row held by another relay (its lock skipped above): the key's later rows wait
            # for that relay's round. Those rows take room in this batch, but only for that round.
            blockers = await conn.fetch(
                f"SELECT ordering_key, min(id) FROM {o} WHERE state = {PENDING}"
                " AND ordering_key = ANY($1::text[]) AND NOT (id = ANY($2::bigint[])) GROUP BY ordering_key",
                keys,
                [r.id for r in rows],
            )
            first_elsewhere = {k: int(i) for k, i in blockers}
            rows = [r for r in rows if r.ordering_key is None or r.id < first_elsewhere.get(r.ordering_key, r.id + 1)]
        return Claim(rows=rows)

    async def _settle(self, conn: asyncpg.Connection, claim: Claim) -> None:
        o = self.outbox_table
        if claim.sent_ids:
            await conn.execute(
                f"UPDATE {o} SET state = {SENT}, sent_at = now(), attempts = attempts + 1 WHERE id = ANY($1::bigint[])",
                claim.sent_ids,
            )
        if claim.retries:
            ids, delays, errors = zip(*claim.retries, strict=True)
            await conn.execute(
                f"UPDATE {o} AS r SET attempts = r.attempts + 1,"
                " next_attempt_at = now() + make_interval(secs => v.delay), last_error = v.error"
                " FROM unnest($1::bigint[], $2::float8[], $3::text[]) AS v(id, delay, error) WHERE r.id = v.id",
                list(ids),
                list(delays),
                list(errors),
            )
        if claim.failures:
            ids, reasons = zip(*claim.failures, strict=True)
            await conn.execute(
                f"UPDATE {o} AS r SET state = {FAILED}, attempts = r.attempts + 1, last_error = v.reason"
                " FROM unnest($1::bigint[], $2::text[]) AS v(id, reason) WHERE r.id = v.id",
                list(ids),
                list(reasons),
            )

    async def _listen(self) -> None:
        listener = self._listener
        if listener is not None and not listener.is_closed():
            return
        self._listener = None
        listener = await asyncpg.connect(self.url, timeout=self.connect_timeout)
        try:
            await listener.add_listener(self.channel, self._notified)
        except BaseException:
            await listener.close()
            raise
        self._listener = listener
        self._new_rows.set()  # rows may have come while nobody listened

    def _notified(self, *args: Any) -> None:
        self._new_rows.set()

    async def wait_for_rows(self, timeout: float) -> None:
        if self.notify:
            try:
                await self._listen()
            except Exception as exc:
                log.debug("no LISTEN connection (polling only): %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._new_rows.wait(), timeout)
        self._new_rows.clear()

    async def purge_sent(self, older_than: float) -> int:
        total = 0
        while True:
            async with self.transaction() as tx:
                # Rows someone else holds (an archiving job's open transaction) are left for a later cleanup,
                # and a table lock is waited for 5 s at most: the DELETE waited on them with no end.
                await tx.execute("SET LOCAL lock_timeout = '5s'")
                status = await tx.execute(
                    f"DELETE FROM {self.outbox_table} WHERE id IN (SELECT id FROM {self.outbox_table}"
                    f" WHERE state = {SENT} AND sent_at < now() - make_interval(secs => $1) LIMIT 5000"
                    " FOR UPDATE SKIP LOCKED)",
                    float(older_than),
                )
            deleted = _count(status)
            total += deleted
            if deleted < 5000:
                return total

    async def failed_rows(self, limit: int = 100) -> list[FailedRow]:
        async with self._connection() as conn:
            records = await conn.fetch(
                f"SELECT id, message_id, exchange, routing_key, length(body), last_error FROM {self.outbox_table}"
                f" WHERE state = {FAILED} ORDER BY id LIMIT $1",
                limit,
            )
        return [FailedRow(int(a), str(b), str(c), str(d), int(e or 0), str(f or "")) for a, b, c, d, e, f in records]

    async def retry_failed(self, ids: Sequence[int] | None = None) -> int:
        async with self.transaction() as tx:
            if ids is None:
                status = await tx.execute(
                    f"UPDATE {self.outbox_table} SET state = {PENDING}, next_attempt_at = '-infinity'"
                    f" WHERE state = {FAILED}"
                )
            else:
                status = await tx.execute(
                    f"UPDATE {self.outbox_table} SET state = {PENDING}, next_attempt_at = '-infinity'"
                    f" WHERE state = {FAILED} AND id = ANY($1::bigint[])",
                    list(ids),
                )
            if self.notify:
                await tx.execute("SELECT pg_notify($1, '')", self.channel)
        return _count(status)

    async def counts(self) -> dict[str, int]:
        async with self._connection() as conn:
            records = await conn.fetch(f"SELECT state, count(*) FROM {self.outbox_table} GROUP BY state")
        names = {PENDING: "pending", SENT: "sent", FAILED: "failed"}
        counts = {"pending": 0, "sent": 0, "failed": 0}
        for state, n in records:
            counts[names.get(state, f"state {state}")] = int(n)
        return counts

    # ------------------------------------------------------------ inbox

    async def inbox_record(self, tx: Any, consumer: str, message_id: str) -> InboxRecord | None:
        inserted = await tx.fetchval(
            f"INSERT INTO {self.inbox_table} (consumer, message_id) VALUES ($1, $2)"
            " ON CONFLICT (consumer, message_id) DO NOTHING RETURNING 1",
            consumer,
            message_id,
        )
        if inserted is not None:
            return None
        found = await tx.fetchrow(
            f"SELECT reply, reply_content_type FROM {self.inbox_table} WHERE consumer = $1 AND message_id = $2",
            consumer,
            message_id,
        )
        if found is None:  # pragma: no cover - a conflict yet no row: only if the table was changed under us
            return InboxRecord(None, None)
        return InboxRecord(found[0], found[1])

    async def inbox_reply(self, tx: Any, consumer: str, message_id: str, body: bytes, content_type: str | None) -> None:
        await tx.execute(
            f"UPDATE {self.inbox_table} SET reply = $3, reply_content_type = $4"
            " WHERE consumer = $1 AND message_id = $2",
            consumer,
            message_id,
            body,
            content_type,
        )

    async def purge_inbox(self, older_than: float, consumer: str | None = None) -> int:
        async with self.transaction() as tx:
            status = await tx.execute(
                f"DELETE FROM {self.inbox_table} WHERE processed_at < now() - make_interval(secs => $1)"
                " AND ($2::text IS NULL OR consumer = $2)",
                float(older_than),
                consumer,
            )
        return _count(status)


_TEXT = frozenset({"text", "varchar"})  # not citext: it would take ids that differ in case as one
_INT = frozenset({"int2", "int4", "int8"})
_STAMP = frozenset({"timestamptz"})
# Column: (types it may have, whether a row inserted without it needs a default).
_OUTBOX_SHAPE: dict[str, tuple[frozenset[str], bool]] = {
    "id": (_INT, True),
    "message_id": (_TEXT, False),
    "exchange": (_TEXT, False),
    "routing_key": (_TEXT, False),
    "ordering_key": (_TEXT, False),
    "body": (frozenset({"bytea"}), False),
    "content_type": (_TEXT, False),
    "headers": (_TEXT | {"json", "jsonb"}, False),
    "properties": (_TEXT | {"json", "jsonb"}, False),
    "mandatory": (frozenset({"bool"}), False),
    "state": (_INT, True),
    "attempts": (_INT, True),
    "created_at": (_STAMP, False),
    "next_attempt_at": (_STAMP, True),
    "sent_at": (_STAMP, False),
    "last_error": (_TEXT, False),
}
_INBOX_SHAPE: dict[str, tuple[frozenset[str], bool]] = {
    "consumer": (_TEXT, False),
    "message_id": (_TEXT, False),
    "processed_at": (_STAMP, True),
    "reply": (frozenset({"bytea"}), False),
    "reply_content_type": (_TEXT, False),
}


async def _shape_problems(
    tx: asyncpg.Connection, table: str, shape: dict[str, tuple[frozenset[str], bool]], unique: tuple[str, ...]
) -> list[str]:
    """What in ``table`` (as it exists) keeps amqpkit from using it: a column missing or of another type, no
    default where amqpkit inserts without the column, another NOT NULL column, no unique key on ``unique``."""
    columns = await tx.fetch(  # a domain's column is taken as its base type, through domains over domains
        "WITH RECURSIVE base(attname, oid, not_null, dflt, coll) AS ("
        " SELECT a.attname, a.atttypid, a.attnotnull,"
        " a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '', a.attcollation"
        " FROM pg_attribute AS a WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped"
        " UNION ALL SELECT b.attname, t.typbasetype, b.not_null, b.dflt, b.coll FROM base AS b"
        " JOIN pg_type AS t ON t.oid = b.oid WHERE t.typtype = 'd')"
        " SELECT b.attname, t.typname, b.not_null, b.dflt, COALESCE(c.collisdeterministic, true)"
        " FROM base AS b JOIN pg_type AS t ON t.oid = b.oid AND t.typtype <> 'd'"
        " LEFT JOIN pg_collation AS c ON c.oid = b.coll",
        table,
    )
    found = {str(name): (str(kind), bool(not_null), bool(default)) for name, kind, not_null, default, _ in columns}
    problems = [
        f"{table}.{name} compares without telling every difference (a nondeterministic collation): distinct "
        "message ids would count as one"
        for name, _kind, _null, _default, deterministic in columns
        if name in unique and not deterministic
    ]
    for name, (kinds, needs_default) in shape.items():
        if name not in found:
            problems.append(f"{table} has no column {name}")
            continue
        kind, _, default = found[name]
        if kind not in kinds:
            problems.append(f"{table}.{name} is {kind}, not {' or '.join(sorted(kinds))}")
        elif needs_default and not default:
            problems.append(f"{table}.{name} has no default")
    for name, (_kind, not_null, default) in found.items():
        if name not in shape and not_null and not default:
            problems.append(f"{table}.{name} is NOT NULL without a default (amqpkit does not write it)")
    if unique:
        # Its key columns only (an INCLUDE column is not part of it), and checked at once: ON CONFLICT cannot use
        # a deferrable key.
        keyed = await tx.fetchval(
            "SELECT count(*) FROM pg_index AS i WHERE i.indrelid = $1::regclass AND i.indisunique"
            " AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL AND i.indnkeyatts = $2"
            " AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute AS a"
            "      WHERE a.attrelid = i.indrelid"
            "      AND a.attnum = ANY((i.indkey::int2[])[0:i.indnkeyatts - 1])) = $3::text[]",
            table,
            len(unique),
            sorted(unique),
        )
        if not keyed:
            problems.append(f"{table} has no unique key on ({', '.join(unique)}), so nothing would be deduplicated")
    return problems


def _closed(conn: asyncpg.Connection) -> bool:
    """Whether a pool's connection is closed (the pool lets a closed one go at once, which asyncpg then refuses
    to say)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


async def _committable(conn: asyncpg.Connection) -> None:
    """Raise :class:`StorageError` unless ``conn``'s transaction can commit.

    A statement that failed aborts the whole transaction, even when the block caught its error, and
    asyncpg's COMMIT then becomes a ROLLBACK without a word: the block would end as if committed. One
    round trip asks first.
    """
    if not conn.is_in_transaction():
        raise StorageError(
            "the transaction ended inside its block (a COMMIT or ROLLBACK there): its end committed nothing"
        )
    try:
        await conn.execute("SELECT 1")
    except asyncpg.InFailedSQLTransactionError:
        raise StorageError(
            "the transaction was aborted by a statement whose error was caught, so PostgreSQL rolls it back: "
            "nothing was committed (catch a database error inside a savepoint: async with tx.transaction(): ...)"
        ) from None


def _count(status: str) -> int:
    """Rows affected, from a command tag such as ``DELETE 12``."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except (ValueError, AttributeError):
        return 0


def _password(url: str) -> str | None:
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None
