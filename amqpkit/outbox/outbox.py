"""Writing to the outbox, and opening a store by URL."""

from __future__ import annotations

import os
from typing import Any

from .. import _hooks
from ..codec import AutoCodec, encode_body
from ..message import Envelope, basic_properties, check_sendable
from ..topology import Exchange
from .postgres import PostgresStore
from .sqlite import SqliteStore
from .storage import StorageError, Store, dump_headers, dump_properties

__all__ = ["Outbox", "open_store", "store_for"]

_AUTO: AutoCodec[Any] = AutoCodec()


class Outbox:
    """Stores messages in the caller's open transaction; a :class:`~amqpkit.outbox.Relay` publishes them.

    ::

        outbox = Outbox(store)
        async with store.transaction() as tx:
            await tx.execute("UPDATE orders SET state = 'paid' WHERE id = $1", order_id)
            await outbox.add(tx, OrderPaid(id=order_id), exchange="orders",
                             routing_key="order.paid", ordering_key=f"order-{order_id}")

    The row commits or rolls back with the transaction's other changes: a
    rolled-back transaction leaves no event, a committed one always gets its
    event published (at least once, always with the same message id).

    With :func:`amqpkit.telemetry.instrument` in effect, the row also keeps
    the trace context current at ``add`` (W3C ``traceparent``/``tracestate``
    in its headers), and the relay publishes it as a child of that span: the
    event stays in the trace of the request that wrote it.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(
        self,
        tx: Any,
        message: Envelope | bytes | Any,
        *,
        exchange: str | Exchange = "",
        routing_key: str = "",
        ordering_key: str | None = None,
        mandatory: bool = True,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
    ) -> str:
        """Add one message to the outbox inside ``tx``; returns its message id.

        ``message`` is an :class:`~amqpkit.Envelope` (sent with its
        properties), ``bytes``, or a value encoded as the patterns' default
        codec does (JSON, text for ``str``). Header values must be JSON
        values. Messages with the same ``ordering_key`` are published in the
        order their transactions committed. ``mandatory`` (the default) makes
        a message that no queue takes count as not sent: the relay tries it
        again later.
        """
        if not self.store.in_transaction(tx):
            raise StorageError(
                f"outbox.add needs a {self.store.name} connection with an open transaction "
                "(the caller's own, e.g. from store.transaction()), got "
                f"{type(tx).__name__}"
            )
        if isinstance(message, Envelope):
            envelope = message
        else:
            body, detected = encode_body(_AUTO, message)
            envelope = Envelope(body, content_type=content_type or detected)
        row_headers = {**envelope.headers, **headers} if headers else envelope.headers
        hook = _hooks.outbox_add
        if hook is not None:  # instrumented: the row carries the writer's trace context to the relay
            row_headers = dict(row_headers)
            hook(row_headers)
        if message_id is not None:
            envelope.message_id = message_id
        if not envelope.message_id:
            envelope.message_id = os.urandom(16).hex()
        if content_type is not None:
            envelope.content_type = content_type
        row = {
            "message_id": envelope.message_id,
            "exchange": exchange if isinstance(exchange, str) else exchange.name,
            "routing_key": routing_key,
            "ordering_key": ordering_key,
            "body": bytes(envelope.body),
            "content_type": envelope.content_type,
            "headers": dump_headers(row_headers),
            "properties": dump_properties(envelope),
            "mandatory": mandatory,
        }
        # a message AMQP cannot carry is refused now, in the writer's transaction, not found by the relay
        properties = basic_properties(envelope)
        properties.headers = row_headers or None
        check_sendable(properties)
        await self.store.add(tx, row)
        return envelope.message_id


def store_for(url: str, **options: Any) -> Store:
    """A store (not yet open) for a database URL.

    ``sqlite:///relative/file.db``, ``sqlite:////absolute/file.db``;
    ``postgresql://user:password@host:port/database`` (``postgres://`` too).
    ``options`` go to the store's constructor (``prefix``, ``schema``...).
    """
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise ValueError("a database URL starts with sqlite: or postgresql:")
    if scheme == "sqlite":
        if rest.startswith("///"):
            path = rest[3:]
        elif rest.startswith("//"):
            path = rest[2:]
        else:
            path = rest
        path = path.split("?", 1)[0]
        if not path or path == ":memory:":
            raise ValueError("a SQLite outbox needs a file (sqlite:///file.db): the relay reads it too")
        return SqliteStore(path, **options)
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url, **options)
    raise ValueError(f"unknown database URL scheme {scheme!r} (sqlite or postgresql)")


async def open_store(url: str, *, create: bool = True, **options: Any) -> Store:
    """Open the store for ``url`` and, with ``create``, make its tables if they are missing.

    Tables found (made by a migration tool, with ``create=False``, or by an
    older release) are checked: :class:`~amqpkit.outbox.StorageError` names
    each one missing and each way one does not fit, such as an inbox without
    its unique key, which would let a redelivered message run again.

    Raises :class:`~amqpkit.outbox.StorageUnreachable` (naming host and port,
    or the file, never a password) when the database does not answer.
    """
    store = store_for(url, **options)
    await store.open()
    try:
        if create:
            await store.create_tables()
        elif isinstance(store, SqliteStore | PostgresStore):  # the only stores store_for makes
            await store.check_tables()
    except BaseException:
        await store.close()
        raise
    return store
