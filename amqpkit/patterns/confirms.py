"""Publisher confirms, three ways behind one API: the strategies of RabbitMQ's confirms tutorial.

- ``window=1``: one at a time. Each :meth:`ConfirmingPublisher.publish`
  returns once the broker confirmed that message. Simplest, slowest.
- ``window=N, batch=True``: in batches. Messages go out without waiting until
  N are outstanding; then the publisher waits for all N before going on.
- ``window=N``: asynchronous, with at most N confirms outstanding. A publish
  waits only while the window is full, and each message's outcome arrives
  when its own confirm does.

In every mode each message gets an :class:`Outcome` — confirmed, nacked,
returned (mandatory and unroutable) or failed — reported to ``on_outcome``.
Failures are counted in :attr:`ConfirmingPublisher.failed`, and the latest
``keep_failures`` of them are kept in :attr:`ConfirmingPublisher.failures`
(a long-running publisher must not keep every one); :meth:`flush` waits for
all outstanding confirms.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Self

from typing_extensions import TypeVar  # with a default (PEP 696)

from ..codec import Codec
from ..connection import Broker
from ..errors import PublishError
from ..message import new_message_id
from ..topology import Exchange
from .pubsub import Publisher

__all__ = ["ConfirmingPublisher", "Outcome"]

# Any when nothing says (no codec given): `Publisher(broker, x).publish(model)` needs no annotation.
T = TypeVar("T", default=Any)

DEFAULT_KEEP_FAILURES = 1000


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one published message."""

    message_id: str
    routing_key: str
    #: Why it failed: the error's type, text and fields, without its traceback or cause (an outcome does not keep
    #: the message, or the connection it was sent on, in memory).
    error: PublishError | None = None

    @property
    def confirmed(self) -> bool:
        return self.error is None


def _settled(exc: PublishError) -> PublishError:
    """``exc`` as an :class:`Outcome` keeps it: its type, text and fields, without its traceback or the errors it
    came from, whose frames and fields hold the message (body and envelope), the returned message, the channel
    and, after a reconnect, the connection of that time. ``failures`` keeps up to ``keep_failures`` outcomes: with
    them, 256 KiB messages kept 527 KiB each."""
    exc.__traceback__ = None
    exc.__cause__ = exc.__context__ = None
    exc.__suppress_context__ = True
    return exc


class ConfirmingPublisher(Generic[T]):
    """Publishes with publisher confirms, ``window`` confirms outstanding at most (see module docs).

    Built on :class:`~amqpkit.Publisher`, which does the encoding, declaring and
    confirming; this class adds the window and the per-message outcomes.
    """

    def __init__(
        self,
        broker: Broker,
        exchange: Exchange | str = "",
        codec: Codec[T] | None = None,
        *,
        window: int = 1,
        batch: bool = False,
        persistent: bool = True,
        mandatory: bool = False,
        timeout: float | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
        keep_failures: int = DEFAULT_KEEP_FAILURES,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if keep_failures < 0:
            raise ValueError("keep_failures must not be negative")
        self.publisher: Publisher[T] = Publisher(broker, exchange, codec, persistent=persistent, mandatory=mandatory)
        self.window = window
        self.batch = batch
        self.timeout = timeout
        self.on_outcome = on_outcome
        self._slots = asyncio.Semaphore(window)
        self._outstanding: set[asyncio.Task[Outcome]] = set()
        self.confirmed = 0
        self.failed = 0
        # The latest failures only: the count above has them all, ``on_outcome`` sees each one.
        self.failures: deque[Outcome] = deque(maxlen=keep_failures)

    async def __aenter__(self) -> Self:
        await self.publisher.declare()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.flush()

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    async def publish(
        self,
        value: T,
        *,
        routing_key: str = "",
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> asyncio.Future[Outcome]:
        """Send ``value``; returns a future of its :class:`Outcome`.

        One at a time (``window=1``), the outcome is already there. Otherwise
        this returns once the message is handed to the connection and a
        window slot is held (in batch mode, once the batch is confirmed when
        this message filled it).
        """
        await self.publisher.declare()
        send = self._send(value, routing_key, headers, message_id or new_message_id())
        if self.window == 1:
            done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            done.set_result(await send)
            return done
        if not self.batch:
            await self._slots.acquire()
        task = asyncio.ensure_future(send)
        self._outstanding.add(task)
        task.add_done_callback(self._release)
        # Let the task write its frames now, so messages leave in publish order.
        await asyncio.sleep(0)
        if self.batch and len(self._outstanding) >= self.window:
            await self.flush()
        return task

    def _release(self, task: asyncio.Task[Outcome]) -> None:
        self._outstanding.discard(task)
        if not self.batch:
            self._slots.release()

    async def _send(self, value: T, routing_key: str, headers: Mapping[str, Any] | None, message_id: str) -> Outcome:
        try:
            await self.publisher.publish(
                value, routing_key=routing_key, headers=headers, message_id=message_id, timeout=self.timeout
            )
            outcome = Outcome(message_id, routing_key)
            self.confirmed += 1
        except PublishError as exc:
            outcome = Outcome(message_id, routing_key, _settled(exc))
            self.failed += 1
            self.failures.append(outcome)
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    async def flush(self) -> list[Outcome]:
        """Wait for every outstanding confirm; returns their outcomes."""
        if not self._outstanding:
            return []
        return list(await asyncio.gather(*self._outstanding))
