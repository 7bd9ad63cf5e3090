"""The storage protocol the outbox, its relay and the inbox share, and what crosses it.

A backend is one class that implements :class:`Store`: SQLite
(:class:`~amqpkit.outbox.sqlite.SqliteStore`) and PostgreSQL
(:class:`~amqpkit.outbox.postgres.PostgresStore`) ship with amqpkit. Its
methods are small on purpose; what the relay and the inbox decide (ordering,
backoff, what a duplicate is) lives above it, in one place for every backend.

Rows move through three states: *pending* (committed, not yet confirmed by
the broker), *sent* (confirmed; deleted after the retention period) and
*failed* (the broker can never take it, e.g. too large: kept aside with the
reason, never retried by itself).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from ..errors import AmqpkitError
from ..message import Envelope

__all__ = [
    "PENDING",
    "SENT",
    "FAILED",
    "Claim",
    "FailedRow",
    "InboxRecord",
    "OutboxRow",
    "StorageError",
    "StorageUnreachable",
    "Store",
    "db_host_port",
    "redact_db_url",
]

PENDING = 0
SENT = 1
FAILED = 2

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")


class StorageError(AmqpkitError):
    """The outbox or inbox database refused or failed an operation."""


class StorageUnreachable(StorageError):
    """The database did not answer (or refused the login). Names host and port (or the file), never a password."""

    def __init__(self, message: str, *, target: str) -> None:
        super().__init__(message)
        self.target = target


def refuse_misfits(problems: Sequence[str]) -> None:
    """Raise :class:`StorageError` listing ``problems`` with the outbox and inbox tables as found, if any."""
    if problems:
        raise StorageError(
            f"the outbox and inbox tables are not as amqpkit makes them: {'; '.join(problems)} (create_tables() "
            "makes missing ones; drop one that does not fit to have it made, or alter it)"
        )


def check_name(value: str, what: str) -> str:
    """A table prefix or schema name, checked: it is written into SQL, so letters, digits and '_' only."""
    if value and not _NAME.match(value):
        raise ValueError(f"{what} {value!r} must be letters, digits and '_' (not starting with a digit)")
    return value


def redact_db_url(url: str) -> str:
    """A database URL with its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()
    except ValueError:
        return "<unparseable url>"


def db_host_port(url: str) -> str:
    """``host:port`` of a PostgreSQL URL (5432 by default; the socket folder for a Unix-socket URL)."""
    try:
        parts = urlsplit(url)
        port = parts.port or 5432
    except ValueError:
        return "<unparseable url>"
    host = parts.hostname
    if not host:
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        host = unquote(query.get("host", "localhost"))
    return f"{host}:{port}"


def dump_headers(headers: Mapping[str, Any]) -> str | None:
    """Headers as JSON for the outbox row; a value JSON cannot hold is refused when the row is added."""
    if not headers:
        return None
    try:
        return json.dumps(dict(headers), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"outbox headers must be JSON values (str, number, bool, None, list, dict): {exc}") from None


def dump_properties(envelope: Envelope) -> str | None:
    """The envelope's other properties as JSON (only those set)."""
    props: dict[str, Any] = {}
    for name in ("content_encoding", "correlation_id", "reply_to", "type", "expiration", "priority", "app_id"):
        value = getattr(envelope, name)
        if value is not None:
            props[name] = value
    if not envelope.persistent:
        props["persistent"] = False
    if envelope.timestamp is not None:
        stamp = envelope.timestamp
        props["timestamp"] = (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
    return json.dumps(props, separators=(",", ":")) if props else None


def _loads(text: Any) -> dict[str, Any]:
    """A JSON object column; anything else (tampered, NULL) reads as empty."""
    if text is None:
        return {}
    if isinstance(text, bytes | bytearray | memoryview):
        text = bytes(text).decode("utf-8", "replace")
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(slots=True)
class OutboxRow:
    """One pending outbox row, as the relay publishes it."""

    id: int
    message_id: str
    exchange: str
    routing_key: str
    ordering_key: str | None
    body: bytes
    content_type: str | None
    headers: dict[str, Any]
    properties: dict[str, Any]
    mandatory: bool
    attempts: int
    #: Why a column could not be read (a row written outside amqpkit, say a text body): kept aside, never sent.
    unreadable: str | None = None

    @classmethod
    def from_db(cls, record: Sequence[Any]) -> OutboxRow:
        """From the columns in :data:`ROW_COLUMNS` order. A value of the wrong type (SQLite keeps what it is given)
        makes the row ``unreadable``, not the whole batch: raised here, it stopped every row behind it, each round."""
        rid, message_id, exchange, routing_key, ordering_key, body, content_type, headers, props, mandatory, att = (
            record
        )
        problems = []
        if body is None or isinstance(body, bytes | bytearray | memoryview):
            data = bytes(body or b"")
        else:
            data = b""
            problems.append(f"its body is {type(body).__name__}, not bytes")
        try:
            attempts = int(att or 0)
        except (TypeError, ValueError, OverflowError):
            attempts = 0
            problems.append(f"its attempts column is {type(att).__name__}, not a number")
        return cls(
            id=int(rid),
            message_id=str(message_id),
            exchange=str(exchange or ""),
            routing_key=str(routing_key or ""),
            ordering_key=ordering_key if ordering_key is None or isinstance(ordering_key, str) else str(ordering_key),
            body=data,
            content_type=content_type if content_type is None or isinstance(content_type, str) else None,
            headers=_loads(headers),
            properties=_loads(props),
            mandatory=bool(mandatory),
            attempts=attempts,
            unreadable="; ".join(problems) or None,
        )

    def envelope(self) -> Envelope:
        p = self.properties
        stamp = p.get("timestamp")
        return Envelope(
            self.body,
            content_type=self.content_type,
            content_encoding=p.get("content_encoding"),
            message_id=self.message_id,
            correlation_id=p.get("correlation_id"),
            reply_to=p.get("reply_to"),
            headers=dict(self.headers),
            timestamp=datetime.fromtimestamp(float(stamp), UTC) if isinstance(stamp, int | float) else None,
            type=p.get("type"),
            expiration=p.get("expiration"),
            persistent=p.get("persistent", True) is not False,
            priority=p.get("priority"),
            app_id=p.get("app_id"),
        )


ROW_COLUMNS = (
    "id, message_id, exchange, routing_key, ordering_key, body, content_type, headers, properties, mandatory, attempts"
)


@dataclass(slots=True)
class FailedRow:
    """A row kept aside: the broker could not take it (``reason`` says why)."""

    id: int
    message_id: str
    exchange: str
    routing_key: str
    size: int
    reason: str


@dataclass(slots=True)
class InboxRecord:
    """What the inbox holds of a message a consumer already processed: the stored reply, if any."""

    reply: bytes | None
    content_type: str | None


@dataclass(slots=True)
class Claim:
    """Rows handed to one relay, and what became of each; the store writes the outcomes when the claim ends.

    A row given no outcome stays pending as it was (the relay skipped it, e.g.
    because an earlier row with its ordering key failed in this batch).
    """

    rows: list[OutboxRow]
    standby: bool = False  # another relay holds the store (SQLite: one relay at a time)
    sent_ids: list[int] = field(default_factory=list)
    retries: list[tuple[int, float, str]] = field(default_factory=list)  # (id, delay s, error)
    failures: list[tuple[int, str]] = field(default_factory=list)  # (id, reason)

    def sent(self, row: OutboxRow) -> None:
        self.sent_ids.append(row.id)

    def retry(self, row: OutboxRow, delay: float, error: str) -> None:
        self.retries.append((row.id, delay, error[:2000]))

    def failed(self, row: OutboxRow, reason: str) -> None:
        self.failures.append((row.id, reason[:2000]))


@runtime_checkable
class Store(Protocol):
    """What a database backend provides to :class:`~amqpkit.outbox.Outbox`, the relay and the inbox.

    ``tx`` is the backend's connection inside an open transaction (an
    ``aiosqlite.Connection``, an ``asyncpg.Connection``): the caller's own,
    so outbox rows and inbox records commit or roll back with its changes.
    """

    name: str  # "sqlite" or "postgresql"
    description: str  # where it is, without a password

    async def open(self) -> None:
        """Connect; :class:`StorageUnreachable` when the database does not answer."""

    async def close(self) -> None: ...

    async def create_tables(self) -> None:
        """Create the outbox and inbox tables and indexes if missing."""

    async def drop_tables(self) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        """A connection in a new transaction: committed when the block ends, rolled back if it raises.

        :class:`StorageError` when the block ends normally but its transaction cannot commit (aborted by a
        statement whose error the block caught, or ended inside the block): never a silent rollback.
        """

    def transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by this backend) is worth trying again later: a lost connection, a lock."""

    def in_transaction(self, tx: Any) -> bool:
        """Whether ``tx`` is a connection of this backend with a transaction open (or about to open)."""

    async def add(self, tx: Any, row: dict[str, Any]) -> None:
        """Insert one pending row (columns by name) on ``tx``; wakes listening relays at commit."""

    def claim(self, limit: int) -> AbstractAsyncContextManager[Claim]:
        """Up to ``limit`` due pending rows that no other relay holds, in commit order per ordering key.

        No row is handed out while an earlier pending row with the same
        ordering key is held elsewhere or waits for a retry. The outcomes
        recorded on the claim are written when the block ends.
        """

    async def wait_for_rows(self, timeout: float) -> None:
        """Return when new rows may have been committed, or after ``timeout`` seconds."""

    async def purge_sent(self, older_than: float) -> int:
        """Delete rows sent more than ``older_than`` seconds ago; how many."""

    async def failed_rows(self, limit: int = 100) -> list[FailedRow]: ...

    async def retry_failed(self, ids: Sequence[int] | None = None) -> int:
        """Make failed rows pending again (all of them with ``ids=None``); how many."""

    async def counts(self) -> dict[str, int]:
        """Rows by state: pending, sent, failed."""

    async def inbox_record(self, tx: Any, consumer: str, message_id: str) -> InboxRecord | None:
        """Record (consumer, message id) on ``tx``: None when it is new, else what was stored for it before."""

    async def inbox_reply(self, tx: Any, consumer: str, message_id: str, body: bytes, content_type: str | None) -> None:
        """Store the reply for a message recorded in this transaction."""

    async def purge_inbox(self, older_than: float, consumer: str | None = None) -> int:
        """Delete inbox records older than ``older_than`` seconds, only ``consumer``'s when given; how many."""
