"""SQLite backend (aiosqlite): the embedded default, nothing to install or run.

One connection per store, in WAL mode, used by one coroutine at a time (an
asyncio lock): SQLite has a single writer anyway. Write transactions start
with ``BEGIN IMMEDIATE``, so a transaction that is going to write takes the
lock up front instead of failing half-way; another process writing the same
file waits up to ``busy_timeout`` seconds.

One relay at a time per database file: a relay holds an exclusive
``flock`` on ``<file>-relay.lock`` while it runs, which the kernel releases
the moment its process dies (no lease to wait out after a crash). A second
relay, in this process or another, stands by until the lock is free. Since
SQLite commits one writer after another, row ids are in commit order, and
rows leave in id order.
"""

# Table names in the SQL below come from check_name() (letters, digits, "_"); every value is a parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

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
    refuse_misfits,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["SqliteStore"]

log = logging.getLogger("amqpkit.outbox")


class SqliteStore:
    """Outbox and inbox tables in one SQLite file.

    ``synchronous="FULL"`` (the default) makes every commit durable through a
    power cut; ``"NORMAL"`` is faster and still loses nothing when only the
    process dies (its commits are in the WAL file).
    """

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        prefix: str = "amqpkit_",
        busy_timeout: float = 30.0,
        synchronous: str = "FULL",
    ) -> None:
        self.path = Path(path)
        self.prefix = check_name(prefix, "table prefix")
        self.busy_timeout = busy_timeout
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous is FULL, NORMAL or EXTRA")
        self.synchronous = synchronous.upper()
        self.description = f"SQLite {self.path}"
        self.outbox_table = f"{prefix}outbox"
        self.inbox_table = f"{prefix}inbox"
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._new_rows = asyncio.Event()
        self._added = False
        self._relay_fd: int | None = None
        self._file: tuple[int, int] | None = None  # (device, inode) of the file opened

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path} prefix={self.prefix!r}>"

    # ------------------------------------------------------------ connection

    async def open(self) -> None:
        if self._conn is not None:
            return

        def probe() -> None:
            sqlite3.connect(self.path).close()

        try:
            # Opened once on a plain thread first: a file that cannot be opened fails here, without
            # leaving aiosqlite's worker thread to report it after the caller's loop has gone.
            await asyncio.to_thread(probe)
            conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=self.busy_timeout)
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnreachable(f"cannot open SQLite database {self.path}: {exc}", target=str(self.path)) from None
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute(f"PRAGMA synchronous={self.synchronous}")
            self._file = _identity(self.path)
        except (sqlite3.Error, OSError) as exc:
            await conn.close()
            raise StorageUnreachable(f"cannot use SQLite database {self.path}: {exc}", target=str(self.path)) from None
        self._conn = conn

    async def _still_the_file(self) -> None:
        """Before a relay's round: the file this store opened is still the one at its path. Removed or replaced
        (restored from a backup, moved aside), the open connection kept reading the old, unlinked file, and rows
        committed to the new one by other processes stayed pending for ever with nothing said. Replaced: opened
        again, with a warning. Removed: a StorageError each round until a file is back."""
        try:
            now: tuple[int, int] | None = _identity(self.path)
        except FileNotFoundError:
            now = None
        if now is not None and now == self._file:
            return
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()
        if now is None:
            self._file = None  # whatever file comes next is another, even on the same inode number
            raise StorageError(f"{self.description} was removed while this store had it open: nothing to relay "
                               "until a database is there again")  # fmt: skip
        log.warning("%s was replaced by another file while this store had it open; opened again", self.description)
        await self.open()

    async def close(self) -> None:
        self._release_relay_lock()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StorageError(f"{self.description} is not open; call open() first")
        return self._conn

    async def create_tables(self) -> None:
        o, i = self.outbox_table, self.inbox_table
        async with self.transaction() as tx:
            await tx.execute(
                f"""CREATE TABLE IF NOT EXISTS {o} (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    message_id TEXT NOT NULL,
                    exchange TEXT NOT NULL,
                    routing_key TEXT NOT NULL,
                    ordering_key TEXT,
                    body BLOB NOT NULL,
                    content_type TEXT,
                    headers TEXT,
                    properties TEXT,
                    mandatory INTEGER NOT NULL DEFAULT 1,
                    state INTEGER NOT NULL DEFAULT {PENDING},
                    attempts INTEGER NOT NULL DEFAULT 0,
                    created_at REAL NOT NULL,
                    next_attempt_at REAL NOT NULL DEFAULT 0,
                    sent_at REAL,
                    last_error TEXT)"""
            )
            await tx.execute(
                f"""CREATE TABLE IF NOT EXISTS {i} (
                    consumer TEXT NOT NULL,
                    message_id TEXT NOT NULL,
                    processed_at REAL NOT NULL,
                    reply BLOB,
                    reply_content_type TEXT,
                    PRIMARY KEY (consumer, message_id)) WITHOUT ROWID"""
            )
            # Tables made beforehand (by a migration tool, an older release) are used as they are: check them.
            refuse_misfits(await self._misfits(tx))
            await tx.execute(f"CREATE INDEX IF NOT EXISTS {o}_pending ON {o} (id) WHERE state = {PENDING}")
            await tx.execute(f"CREATE INDEX IF NOT EXISTS {o}_key ON {o} (ordering_key, id) WHERE state = {PENDING}")
            await tx.execute(f"CREATE INDEX IF NOT EXISTS {o}_sent ON {o} (sent_at) WHERE state = {SENT}")
            await tx.execute(f"CREATE INDEX IF NOT EXISTS {i}_age ON {i} (processed_at)")

    async def check_tables(self) -> None:
        """Check tables made elsewhere (a migration tool) as :meth:`create_tables` checks them, creating nothing.

        :class:`StorageError` names each table missing and each way one does not fit.
        """
        async with self.transaction() as tx:
            refuse_misfits(await self._misfits(tx))

    async def _misfits(self, tx: aiosqlite.Connection) -> list[str]:
        problems: list[str] = []
        for table, columns, defaulted, unique in (
            (self.outbox_table, _OUTBOX_COLUMNS, ("state", "attempts", "next_attempt_at"), ()),
            (self.inbox_table, _INBOX_COLUMNS, (), ("consumer", "message_id")),
        ):
            cursor = await tx.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
            if await cursor.fetchone() is None:
                problems.append(f"{table} does not exist")
            else:
                problems += await _shape_problems(tx, table, columns, defaulted, unique)
        return problems

    async def drop_tables(self) -> None:
        async with self.transaction() as tx:
            await tx.execute(f"DROP TABLE IF EXISTS {self.outbox_table}")
            await tx.execute(f"DROP TABLE IF EXISTS {self.inbox_table}")

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = self.connection
        async with self._lock:
            self._added = False
            begin = asyncio.ensure_future(conn.execute("BEGIN IMMEDIATE"))
            try:
                await asyncio.shield(begin)
            except asyncio.CancelledError:
                # aiosqlite runs it in its thread all the same: the transaction it opens is ended here, else the
                # connection stayed in it and every later transaction failed ("cannot start a transaction within
                # a transaction"; a relay stopped during its cleanup did it, and the guide's program hung).
                with contextlib.suppress(Exception):
                    await begin
                    if conn.in_transaction:
                        await conn.rollback()
                raise
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    await conn.rollback()
                raise
            if not conn.in_transaction:
                # Ended under the block: rolled back by it, or by SQLite itself after SQLITE_FULL or an I/O error.
                raise StorageError(
                    "the transaction ended inside its block (a rollback or commit there, or SQLite's own rollback "
                    "after an error that was caught): the block's end committed nothing"
                )
            await conn.commit()
            if self._added:
                self._new_rows.set()

    def transient(self, exc: BaseException) -> bool:
        """A locked or busy database file (another writer held it past ``busy_timeout``)."""
        return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))

    def in_transaction(self, tx: Any) -> bool:
        if not isinstance(tx, aiosqlite.Connection):
            return False
        # With implicit transactions (isolation_level not None) the insert itself opens one.
        return bool(tx.in_transaction) or tx.isolation_level is not None

    # ------------------------------------------------------------ outbox

    async def add(self, tx: Any, row: dict[str, Any]) -> None:
        await tx.execute(
            f"INSERT INTO {self.outbox_table} (message_id, exchange, routing_key, ordering_key, body, content_type,"
            " headers, properties, mandatory, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row["message_id"], row["exchange"], row["routing_key"], row["ordering_key"], row["body"],
                row["content_type"], row["headers"], row["properties"], int(row["mandatory"]), time.time(),
            ),
        )  # fmt: skip
        if tx is self._conn:
            self._added = True

    def _take_relay_lock(self) -> bool:
        if self._relay_fd is not None:
            return True
        if fcntl is None:  # pragma: no cover - not POSIX: the caller runs one relay
            self._relay_fd = -1
            return True
        fd = os.open(f"{self.path}-relay.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._relay_fd = fd
        return True

    def _release_relay_lock(self) -> None:
        fd, self._relay_fd = self._relay_fd, None
        if fd is not None and fd >= 0:
            os.close(fd)  # closing the file releases the flock

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[Claim]:
        await self._still_the_file()
        if not self._take_relay_lock():
            yield Claim(rows=[], standby=True)
            return
        o = self.outbox_table
        now = time.time()
        async with self._lock:
            cursor = await self.connection.execute(
                f"""SELECT {ROW_COLUMNS} FROM {o} AS r
                    WHERE r.state = {PENDING} AND r.next_attempt_at <= :now
                      AND NOT EXISTS (SELECT 1 FROM {o} AS e WHERE e.state = {PENDING}
                                      AND e.ordering_key = r.ordering_key AND e.id < r.id
                                      AND e.next_attempt_at > :now)
                    ORDER BY r.id LIMIT :limit""",
                {"now": now, "limit": limit},
            )
            records = await cursor.fetchall()
            await cursor.close()
        claim = Claim(rows=[OutboxRow.from_db(tuple(r)) for r in records])
        yield claim
        if claim.sent_ids or claim.retries or claim.failures:
            await self._settle(claim)

    async def _settle(self, claim: Claim) -> None:
        o = self.outbox_table
        now = time.time()
        async with self.transaction() as tx:
            if claim.sent_ids:
                await tx.executemany(
                    f"UPDATE {o} SET state = {SENT}, sent_at = ?, attempts = attempts + 1 WHERE id = ?",
                    [(now, rid) for rid in claim.sent_ids],
                )
            if claim.retries:
                await tx.executemany(
                    f"UPDATE {o} SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE id = ?",
                    [(now + delay, error, rid) for rid, delay, error in claim.retries],
                )
            if claim.failures:
                await tx.executemany(
                    f"UPDATE {o} SET state = {FAILED}, attempts = attempts + 1, last_error = ? WHERE id = ?",
                    [(reason, rid) for rid, reason in claim.failures],
                )

    async def wait_for_rows(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._new_rows.wait(), timeout)
        self._new_rows.clear()

    async def purge_sent(self, older_than: float) -> int:
        async with self.transaction() as tx:
            cursor = await tx.execute(
                f"DELETE FROM {self.outbox_table} WHERE state = {SENT} AND sent_at < ?", (time.time() - older_than,)
            )
            return cursor.rowcount

    async def failed_rows(self, limit: int = 100) -> list[FailedRow]:
        async with self._lock:
            cursor = await self.connection.execute(
                f"SELECT id, message_id, exchange, routing_key, length(body), last_error FROM {self.outbox_table}"
                f" WHERE state = {FAILED} ORDER BY id LIMIT ?",
                (limit,),
            )
            records = await cursor.fetchall()
        return [FailedRow(int(a), str(b), str(c), str(d), int(e or 0), str(f or "")) for a, b, c, d, e, f in records]

    async def retry_failed(self, ids: Sequence[int] | None = None) -> int:
        async with self.transaction() as tx:
            if ids is None:
                cursor = await tx.execute(
                    f"UPDATE {self.outbox_table} SET state = {PENDING}, next_attempt_at = 0 WHERE state = {FAILED}"
                )
                return cursor.rowcount
            total = 0
            for rid in ids:
                cursor = await tx.execute(
                    f"UPDATE {self.outbox_table} SET state = {PENDING}, next_attempt_at = 0"
                    f" WHERE state = {FAILED} AND id = ?",
                    (rid,),
                )
                total += cursor.rowcount
            return total

    async def counts(self) -> dict[str, int]:
        async with self._lock:
            cursor = await self.connection.execute(f"SELECT state, count(*) FROM {self.outbox_table} GROUP BY state")
            records = await cursor.fetchall()
        names = {PENDING: "pending", SENT: "sent", FAILED: "failed"}
        counts = {"pending": 0, "sent": 0, "failed": 0}
        for state, n in records:
            counts[names.get(state, f"state {state}")] = int(n)
        return counts

    # ------------------------------------------------------------ inbox

    async def inbox_record(self, tx: Any, consumer: str, message_id: str) -> InboxRecord | None:
        cursor = await tx.execute(
            f"INSERT INTO {self.inbox_table} (consumer, message_id, processed_at) VALUES (?, ?, ?)"
            " ON CONFLICT (consumer, message_id) DO NOTHING",
            (consumer, message_id, time.time()),
        )
        if cursor.rowcount == 1:
            return None
        cursor = await tx.execute(
            f"SELECT reply, reply_content_type FROM {self.inbox_table} WHERE consumer = ? AND message_id = ?",
            (consumer, message_id),
        )
        found = await cursor.fetchone()
        if found is None:  # pragma: no cover - ignored yet missing: only if the table was changed under us
            return InboxRecord(None, None)
        reply, content_type = found
        return InboxRecord(
            bytes(reply) if isinstance(reply, bytes | bytearray | memoryview) else None,
            content_type if isinstance(content_type, str) else None,
        )

    async def inbox_reply(self, tx: Any, consumer: str, message_id: str, body: bytes, content_type: str | None) -> None:
        await tx.execute(
            f"UPDATE {self.inbox_table} SET reply = ?, reply_content_type = ? WHERE consumer = ? AND message_id = ?",
            (body, content_type, consumer, message_id),
        )

    async def purge_inbox(self, older_than: float, consumer: str | None = None) -> int:
        async with self.transaction() as tx:
            cursor = await tx.execute(
                f"DELETE FROM {self.inbox_table} WHERE processed_at < ? AND (? IS NULL OR consumer = ?)",
                (time.time() - older_than, consumer, consumer),
            )
            return cursor.rowcount


_OUTBOX_COLUMNS = (
    "id", "message_id", "exchange", "routing_key", "ordering_key", "body", "content_type", "headers", "properties",
    "mandatory", "state", "attempts", "created_at", "next_attempt_at", "sent_at", "last_error",
)  # fmt: skip
_INBOX_COLUMNS = ("consumer", "message_id", "processed_at", "reply", "reply_content_type")


async def _shape_problems(
    tx: aiosqlite.Connection, table: str, columns: Sequence[str], defaulted: Sequence[str], unique: Sequence[str]
) -> list[str]:
    """What in ``table`` (as it exists) keeps amqpkit from using it: a column missing, no default where amqpkit
    inserts without the column, another NOT NULL column, no unique key on ``unique``. SQLite's types are loose:
    not checked."""
    cursor = await tx.execute(f"PRAGMA table_info({table})")
    found = {str(name): (bool(not_null), default is not None or bool(pk)) for _, name, _, not_null, default, pk in
             await cursor.fetchall()}  # fmt: skip
    problems = [f"{table} has no column {name}" for name in columns if name not in found]
    problems += [f"{table}.{name} has no default" for name in defaulted if name in found and not found[name][1]]
    problems += [
        f"{table}.{name} is NOT NULL without a default (amqpkit does not write it)"
        for name, (not_null, default) in found.items()
        if name not in columns and not_null and not default
    ]
    if unique:
        keys = []
        cursor = await tx.execute(f"PRAGMA index_list({table})")
        for _, index, is_unique, _, partial in await cursor.fetchall():
            if is_unique and not partial:
                quoted = '"' + str(index).replace('"', '""') + '"'
                info = await tx.execute(f"PRAGMA index_info({quoted})")
                keys.append(sorted(str(row[2]) for row in await info.fetchall()))
        if sorted(unique) not in keys:
            problems.append(f"{table} has no unique key on ({', '.join(unique)}), so nothing would be deduplicated")
    return problems


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino
