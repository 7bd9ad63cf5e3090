"""A request id that travels with every message an HTTP request causes, and shows in every log line made for it.

Tracing (``SHOP_TRACES``) carries a trace id through the messages when it is
on; this works without it. The gateway takes the caller's ``X-Request-ID``
(letters, digits and ``._:-``, at most 64) or makes one, answers it in
``X-Request-ID``, and keeps it in a context variable while the request runs.
Every message sent on the request's behalf carries it in the header
``x-shop-request-id`` (:func:`headers`): the gateway's RPC calls,
order-write's ``PlaceOrder`` command, the order-manager's calls and its
``OrderCreated`` event (stored with the outbox row, so the relay sends it
later), invoice-write's ``CreateInvoice`` command and ``InvoiceCreated``.
A service handler that takes the :class:`~amqpkit.Delivery` and is wrapped
in :func:`from_message` makes the message's id current while it runs, so
what it sends and logs carries it on. While an id is current, every log
record (the shop's, amqpkit's) ends with ``request_id=<id>``, in plain and
in JSON lines alike.

The header is the shop's own name; amqpkit's :class:`~amqpkit.outbox.Inbox`
deduplicates by ``x-idempotency-key``, which a request id must never be.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

from amqpkit import Delivery

HEADER = "x-shop-request-id"  # on the messages
HTTP_HEADER = "X-Request-ID"  # on the HTTP request and response

_VALID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_current: ContextVar[str | None] = ContextVar("shop_request_id", default=None)

P = ParamSpec("P")
R = TypeVar("R")


def accept(value: str | None) -> str:
    """The caller's id if it is a sane one (it goes into log lines as it is), else a new one."""
    return value if value and _VALID.fullmatch(value) else uuid.uuid4().hex


def current() -> str | None:
    return _current.get()


def headers() -> dict[str, str]:
    """The message headers that carry the current id (none while no id is current)."""
    value = _current.get()
    return {HEADER: value} if value else {}


def of(delivery: Delivery[Any]) -> str | None:
    """The id a message carries, if it carries a sane one."""
    value = delivery.headers.get(HEADER)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and _VALID.fullmatch(value) else None


@contextlib.contextmanager
def using(value: str | None) -> Iterator[None]:
    """``value`` is the current id inside the block."""
    token = _current.set(value)
    try:
        yield
    finally:
        _current.reset(token)


def from_message(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Wrap a handler whose first parameter is the Delivery: the message's id is current while it runs.

    The wrapper keeps the handler's signature and annotations (``functools.wraps``),
    which is what amqpkit reads to know what to pass it.
    """

    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        delivery = args[0] if args else None
        with using(of(delivery) if isinstance(delivery, Delivery) else None):
            return await fn(*args, **kwargs)

    return run


def _install_log_field() -> None:
    """Every record made while an id is current ends with `` request_id=<id>`` (and has ``record.request_id``)."""
    make = logging.getLogRecordFactory()
    if getattr(make, "shop_request_id", False):
        return

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        rec = make(*args, **kwargs)
        value = _current.get()
        rec.request_id = value
        if value is not None:
            message = rec.msg if isinstance(rec.msg, str) else str(rec.msg)
            # The id has no '%' (see _VALID), so the record's own formatting with its args is unchanged.
            rec.msg = f"{message} request_id={value}"
        return rec

    record.shop_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(record)


_install_log_field()
