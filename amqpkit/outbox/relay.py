"""The relay: publishes committed outbox rows with publisher confirms, then marks them sent.

Each round claims a batch (see :meth:`Store.claim`), publishes it and
writes the outcomes in one go:

- rows with the same ordering key go out one after the other, each confirmed
  before the next is sent, so they reach the broker in commit order; rows of
  different keys (and rows without a key) go out concurrently;
- a row the broker did not confirm (no connection, returned as unroutable,
  nacked, timed out) is tried again after a backoff (doubling, with jitter,
  capped), and the later rows of its key wait for it;
- a row the broker can never take (larger than the broker allows, properties
  that cannot be encoded) is kept aside as *failed* with the reason, and the
  relay goes on; ``amqpkit outbox`` tools (or :meth:`Store.retry_failed`)
  bring it back.

With :func:`amqpkit.telemetry.instrument` in effect, each row is published
as a child of the span that added it (the trace context ``Outbox.add``
stored in its headers), so the event stays in the writer's trace.

A crash anywhere, the relay's or the database's or the broker's, at worst
sends a row again: the mark is written after the confirm, so a row confirmed
but not yet marked is published once more, with the same message id. A
consumer dedupes by that id (see :class:`~amqpkit.outbox.Inbox`).

Run it in-process (``async with Relay(store, broker): ...``, a background
task the service owns) or as its own process
(``python -m amqpkit.outbox relay --db URL``, see :func:`main`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import sys
from collections.abc import Sequence
from typing import Any, Self

from .. import _hooks
from .._aio import first_of
from ..connection import Broker
from ..errors import AmqpkitError, ConnectError, ConnectionLost, InvalidMessage, MessageTooLarge, PublishError
from ..message import ENCODER_REFUSALS
from ..settings import BrokerSettings
from .storage import Claim, OutboxRow, StorageError, Store

__all__ = ["Relay", "main"]

log = logging.getLogger("amqpkit.outbox")

CLEANUP_GRACE = 5.0  # seconds a stopping relay waits for a cleanup under way before it cancels it


class Relay:
    """Publishes an outbox's committed rows; one or several may run against the same store.

    ``poll_interval``: how long an idle relay waits before it looks again
    when no wake-up came (default 1 s; PostgreSQL's NOTIFY wakes it sooner,
    and so does a commit through the same SQLite store object).
    ``retention``: sent rows are deleted that many seconds after they were
    sent (every ``cleanup_interval`` seconds, in a task of its own: publishing does not wait for it).
    ``max_attempts``: after that
    many failed publishes a row is kept aside as failed (None: it is tried
    until it goes, its ordering key waiting behind it).
    """

    def __init__(
        self,
        store: Store,
        broker: Broker,
        *,
        batch_size: int = 200,
        poll_interval: float = 1.0,
        publish_timeout: float = 10.0,
        retry_initial: float = 0.5,
        retry_max: float = 60.0,
        retry_jitter: float = 0.2,
        max_attempts: int | None = None,
        retention: float = 24 * 3600.0,
        cleanup_interval: float = 300.0,
    ) -> None:
        _check_values(batch_size=batch_size, poll_interval=poll_interval, publish_timeout=publish_timeout,
                      retry_initial=retry_initial, retry_max=retry_max, retry_jitter=retry_jitter,
                      max_attempts=max_attempts, retention=retention, cleanup_interval=cleanup_interval)  # fmt: skip
        self.store = store
        self.broker = broker
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.publish_timeout = publish_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.retry_jitter = retry_jitter
        self.max_attempts = max_attempts
        self.retention = retention
        self.cleanup_interval = cleanup_interval
        self.sent = 0
        self.retried = 0
        self.failed = 0
        self.errors = 0  # rounds the database failed
        self.purged = 0
        self.standby = False  # another relay holds the store (SQLite)
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._last_cleanup: float | None = None
        self._cleanup: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def start(self) -> None:
        """Run in the background until :meth:`stop`."""
        if self._task is None or self._task.done():
            self._stop.clear()
            self._task = asyncio.get_running_loop().create_task(self.run(), name="amqpkit outbox relay")

    async def stop(self, grace: float = 15.0) -> None:
        """Finish the round in progress (up to ``grace`` seconds), then stop."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Relay until ``stop`` is set (or :meth:`stop` is called)."""
        try:
            await self._run(stop)
        finally:
            cleanup, self._cleanup = self._cleanup, None
            if cleanup is not None:
                # Given a moment to end by itself (a purge is short): cancelled, it is cut in the middle of a
                # statement, which a store must then undo.
                await asyncio.wait({cleanup}, timeout=CLEANUP_GRACE)
                cleanup.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await cleanup

    async def _run(self, stop: asyncio.Event | None) -> None:
        failures = 0
        while not self._stopping(stop):
            try:
                handled = await self.run_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The database (or something under it) failed: nothing was marked, try again shortly.
                self.errors += 1
                failures += 1
                delay = min(5.0, 0.1 * 2 ** min(failures, 6))
                log.warning("outbox relay round failed (%s: %s); again in %.2g s", type(exc).__name__, exc, delay)
                await self._pause(delay, stop)
                continue
            self._cleanup_if_due()
            if handled < self.batch_size:
                await self._idle(stop)

    def _stopping(self, stop: asyncio.Event | None) -> bool:
        return self._stop.is_set() or (stop is not None and stop.is_set())

    async def _pause(self, seconds: float, stop: asyncio.Event | None) -> None:
        waits = [asyncio.ensure_future(self._stop.wait())]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds)
        finally:
            for w in waits:
                w.cancel()

    async def _idle(self, stop: asyncio.Event | None) -> None:
        """Wait for a wake-up from the store, the poll interval, or a stop, whichever comes first."""
        waiting = asyncio.ensure_future(self.store.wait_for_rows(self.poll_interval))
        stops = [self._stop.wait()] if stop is None else [self._stop.wait(), stop.wait()]
        try:
            await first_of(waiting, *stops)
        finally:
            waiting.cancel()  # its own task: cancelled here, and waited for (the store's wait cleans up)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiting

    def _cleanup_if_due(self) -> None:
        """Start deleting old sent rows when it is time: in a task of its own, so that publishing never waits
        for it (a DELETE can wait on a lock someone else holds)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._last_cleanup is not None and now - self._last_cleanup < self.cleanup_interval:
            return
        if self._cleanup is not None and not self._cleanup.done():
            return  # the last one still runs
        self._last_cleanup = now
        self._cleanup = loop.create_task(self._purge(), name="amqpkit outbox cleanup")

    async def _purge(self) -> None:
        try:
            purged = await self.store.purge_sent(self.retention)
        except Exception as exc:
            log.warning(
                "could not delete sent outbox rows (%s: %s); publishing goes on, tried again in %g s",
                type(exc).__name__, exc, self.cleanup_interval,
            )  # fmt: skip
            return
        self.purged += purged
        if purged:
            log.info("deleted %d outbox rows sent more than %g s ago", purged, self.retention)

    async def run_once(self) -> int:
        """One round: claim a batch, publish it, record the outcomes; returns how many rows it claimed."""
        async with self.store.claim(self.batch_size) as claim:
            if claim.standby:
                if not self.standby:
                    log.info("another relay holds %s; standing by", self.store.description)
                self.standby = True
                return 0
            if self.standby:
                log.info("relay now active on %s", self.store.description)
            self.standby = False
            if claim.rows:
                await asyncio.gather(*(self._publish_in_order(rows, claim) for rows in _by_key(claim.rows)))
        # Counted once the marks are written: a round whose marks failed sends its rows again.
        self.sent += len(claim.sent_ids)
        self.failed += len(claim.failures)
        return len(claim.rows)

    async def _publish_in_order(self, rows: Sequence[OutboxRow], claim: Claim) -> None:
        for row in rows:
            if row.unreadable is not None:  # written outside amqpkit: never publishable as it is
                error: tuple[bool, str] | None = (True, f"unreadable: {row.unreadable}")
            else:
                error = await self._publish(row)
            if error is None:
                claim.sent(row)
                continue
            permanent, reason = error
            attempts = row.attempts + 1
            if permanent or (self.max_attempts is not None and attempts >= self.max_attempts):
                log.error(
                    "outbox row %d (message %s to %r %r) kept aside as failed after %d attempt(s): %s",
                    row.id, row.message_id, row.exchange, row.routing_key, attempts, reason,
                )  # fmt: skip
                claim.failed(row, reason)
                continue  # a failed row does not hold back its key
            delay = self._delay(attempts)
            log.warning(
                "outbox row %d (message %s) not published (%s); again in %.2g s",
                row.id, row.message_id, reason, delay,
            )  # fmt: skip
            claim.retry(row, delay, reason)
            self.retried += 1
            return  # the later rows of this key wait for this one

    def _delay(self, attempts: int) -> float:
        base = min(self.retry_max, self.retry_initial * 2.0 ** max(0, attempts - 1))
        return max(0.0, base * (1 + random.uniform(-self.retry_jitter, self.retry_jitter)))

    async def _publish(self, row: OutboxRow) -> tuple[bool, str] | None:
        """None when confirmed; else (permanent, reason)."""
        relayed = _hooks.relayed
        if relayed is None:
            return await self._send(row)
        with relayed(row.headers):  # instrumented: the PRODUCER span is a child of the span that added the row
            return await self._send(row)

    async def _send(self, row: OutboxRow) -> tuple[bool, str] | None:
        try:
            await self.broker.publish(
                row.envelope(),
                exchange=row.exchange,
                routing_key=row.routing_key,
                mandatory=row.mandatory,
                timeout=self.publish_timeout,
            )
        except (MessageTooLarge, InvalidMessage) as exc:  # never publishable as it is
            return True, f"{type(exc).__name__}: {exc}"
        except (PublishError, ConnectionLost) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        except ENCODER_REFUSALS as exc:
            # Properties the AMQP encoder refuses for a reason the core could not put in words: never publishable.
            # The encoder's own text is left out: it may show a header's value.
            return True, f"cannot encode the message: {type(exc).__name__}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return None


def _by_key(rows: Sequence[OutboxRow]) -> list[list[OutboxRow]]:
    """Rows grouped by ordering key, in id order within each group; each row without a key alone."""
    groups: dict[str, list[OutboxRow]] = {}
    alone: list[list[OutboxRow]] = []
    for row in rows:
        if row.ordering_key is None:
            alone.append([row])
        else:
            groups.setdefault(row.ordering_key, []).append(row)
    return [*groups.values(), *alone]


async def serve(
    db_url: str,
    amqp_url: str | None,
    stop: asyncio.Event,
    *,
    store_options: dict[str, Any] | None = None,
    relay_options: dict[str, Any] | None = None,
) -> int:
    """The relay process's body: open the store and the broker, relay until ``stop``, report, close."""
    from .outbox import open_store

    store = await open_store(db_url, **(store_options or {}))
    try:
        settings = BrokerSettings(url=amqp_url) if amqp_url else BrokerSettings.from_env()
        # A relay is a service: a broker restarting as it starts is waited for (about a minute and a
        # half), not a reason to exit. A refused login still ends it at once.
        reconnect = settings.reconnect.model_copy(
            update={"connect_attempts": max(20, settings.reconnect.connect_attempts)}
        )
        settings = settings.model_copy(update={"reconnect": reconnect})
        broker = Broker(settings)
        # The connect, which waits for a broker not up yet, is raced against the stop: a SIGTERM meanwhile
        # (a deploy, a pod evicted during the outage) ends it at once, nothing claimed.
        connecting = asyncio.ensure_future(broker.connect())
        try:
            await first_of(connecting, stop.wait())
        finally:
            if not connecting.done():
                connecting.cancel()
                await asyncio.wait({connecting})
        if connecting.cancelled():
            await broker.close(grace=0)
            print("outbox relay stopped before it could connect to RabbitMQ: nothing claimed", file=sys.stderr)
            return 0
        connecting.result()  # ConnectError, AccessRefused: the process ends with 2, as before
        try:  # connected: closed as `async with Broker` would
            relay = Relay(store, broker, **(relay_options or {}))
            print(f"outbox relay: {store.description} -> {', '.join(settings.safe_urls)}", file=sys.stderr)
            await relay.run(stop)
            print(
                f"outbox relay stopped: {relay.sent} sent, {relay.retried} retried, {relay.failed} failed",
                file=sys.stderr,
            )
        finally:
            await broker.close()
    finally:
        await store.close()
    return 0


def main(db_url: str | None = None, amqp_url: str | None = None, **options: Any) -> int:
    """Run a relay as a process until SIGTERM or Ctrl-C; returns the exit code (0, or 2 when it cannot start).

    An unreachable database ends it at once; a broker that does not answer
    yet is tried for about a minute and a half first.

    ``db_url`` defaults to ``AMQPKIT_OUTBOX_DB``, ``amqp_url`` to ``AMQP_URL``
    (give passwords through the environment: ``ps`` shows command lines).
    ``options`` are :class:`Relay` keywords, plus ``prefix`` and ``schema``
    for the store.
    """
    from ..logs import configure_logging
    from ..runner import run_until_signal

    db_url = db_url or os.environ.get("AMQPKIT_OUTBOX_DB")
    if not db_url:
        print("error: no database: give --db URL or set AMQPKIT_OUTBOX_DB", file=sys.stderr)
        return 2
    store_options = {k: options.pop(k) for k in ("prefix", "schema") if options.get(k) is not None}
    options = {k: v for k, v in options.items() if v is not None}
    try:  # before the database and the broker are opened
        _check_values(**{k: v for k, v in options.items() if k in _CHECKED})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(stream=sys.stderr, level=logging.INFO)

    async def run(stop: asyncio.Event) -> int:
        return await serve(db_url, amqp_url, stop, store_options=store_options, relay_options=options)

    try:
        return run_until_signal(run)
    except (StorageError, ConnectError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (AmqpkitError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(Relay.__init__).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}
_CHECKED = frozenset(_DEFAULTS)
_SECONDS = ("poll_interval", "publish_timeout", "retry_initial", "retry_max", "cleanup_interval")  # each > 0
_OTHERS = ("batch_size", "retention", "retry_jitter", "max_attempts")


def _check_values(**given: Any) -> None:
    """ValueError for a :class:`Relay` keyword it cannot run with (``main`` asks before it opens anything, with
    only the keywords it was given: the others are the constructor's defaults)."""
    values = {**_DEFAULTS, **given}
    batch_size, retention, retry_jitter, max_attempts = (values[k] for k in _OTHERS)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size!r}")
    _seconds(**{k: values[k] for k in _SECONDS})
    if not retention >= 0:
        raise ValueError(f"retention is in seconds, 0 or more, not {retention!r}")
    if not 0 <= retry_jitter <= 1:
        raise ValueError(f"retry_jitter is a fraction of the delay, 0 to 1, not {retry_jitter!r}")
    if max_attempts is not None and max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1 (None: no limit), not {max_attempts!r}")


def _seconds(**values: float) -> None:
    """ValueError for the first of ``values`` that is not a positive number of seconds (nan included): a poll
    interval of 0 made an idle relay look again at once, for ever, a busy loop on the database."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} is in seconds, more than 0, not {value!r}")
