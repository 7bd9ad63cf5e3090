"""Transactional outbox and inbox: exactly-once effects on at-least-once delivery.

- :class:`Outbox` stores a message in the caller's open database transaction;
  a :class:`Relay` publishes committed rows with publisher confirms and marks
  them sent (in-process, or ``python -m amqpkit.outbox relay --db URL``).
- :class:`Inbox` wraps a Worker, Subscriber or RpcServer handler so that its
  effects and the record "message X processed by consumer C" commit together.

Storage sits behind one small protocol, :class:`Store`: :class:`SqliteStore`
(aiosqlite, the embedded default) and :class:`PostgresStore` (asyncpg).
``open_store(url)`` opens either from a URL. See patterns/outbox-inbox.md.
"""

from .inbox import IDEMPOTENCY_KEY_HEADER, Inbox, InboxRecordError, default_key
from .outbox import Outbox, open_store, store_for
from .postgres import PostgresStore
from .relay import Relay, main
from .sqlite import SqliteStore
from .storage import Claim, FailedRow, InboxRecord, OutboxRow, StorageError, StorageUnreachable, Store

__all__ = [
    "IDEMPOTENCY_KEY_HEADER",
    "Claim",
    "FailedRow",
    "Inbox",
    "InboxRecord",
    "InboxRecordError",
    "Outbox",
    "OutboxRow",
    "PostgresStore",
    "Relay",
    "SqliteStore",
    "StorageError",
    "StorageUnreachable",
    "Store",
    "default_key",
    "main",
    "open_store",
    "store_for",
]
