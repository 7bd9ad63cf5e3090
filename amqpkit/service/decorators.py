"""The :class:`Service` object and its decorators: what a service is made of, declared before it runs.

Each decorator records a declaration (a :class:`~amqpkit.service.HandlerSpec`,
a :class:`~amqpkit.service.PublisherSpec`, a resource or a hook); nothing
touches the broker until the service starts (:meth:`Service.serve`, or
``amqpkit run``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

from .._handlers import checked_concurrency
from ..codec import Codec
from ..connection import Broker
from ..patterns.work_queue import IdempotencyStore, RetryPolicy
from ..settings import BrokerSettings
from ..topology import Exchange, Queue
from .handlers import check_process_handler
from .lifespan import Lifespan
from .plan import build_plan
from .running import RunningService
from .specs import HandlerKind, HandlerSpec, PublisherSpec, first_line, name_of

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Service:
    """Every handler one service owns, its resources and lifespan hooks; run on one Broker.

    ``settings`` is the default connection (else ``AMQP_URL``, as for
    :class:`~amqpkit.Broker`); ``amqpkit run`` and :meth:`serve` may give
    another.
    """

    def __init__(
        self,
        name: str,
        *,
        version: str = "0.1.0",
        description: str | None = None,
        settings: BrokerSettings | str | None = None,
    ) -> None:
        if not name:
            raise ValueError("a service needs a name")
        self.name = name
        self.version = version
        self.description = description
        self.settings = BrokerSettings(url=settings) if isinstance(settings, str) else settings
        self.handlers: list[HandlerSpec] = []
        self.publishers: list[PublisherSpec[Any]] = []
        self.lifespan = Lifespan()  # its resources and startup and shutdown hooks

    def __repr__(self) -> str:
        return f"<Service {self.name} {self.version}: {len(self.handlers)} handlers, {len(self.publishers)} publishers>"

    # ------------------------------------------------------------------ handler decorators

    def subscriber(
        self,
        exchange: Exchange | str,
        *,
        binding_keys: Sequence[str] = ("",),
        headers: Mapping[str, Any] | None = None,
        match: str = "all",
        queue: Queue | str | None = None,
        codec: Codec[Any] | None = None,
        prefetch: int = 32,
        dead_letter_exchange: str | None = None,
        auto_ack: bool = False,
        executor: Literal["thread", "process"] | None = None,
        processes: int | None = None,
        description: str | None = None,
    ) -> Callable[[F], F]:
        """Handle messages from ``exchange`` (a :class:`~amqpkit.Subscriber`; see it for each option).

        ``queue=None``: a private queue per running instance (every instance
        sees every message); a name: a shared durable queue (instances share the work).
        ``executor="process"``: as for :meth:`worker` (a module-level function that
        gets only the message's value).
        """
        if isinstance(binding_keys, str):
            raise TypeError("binding_keys takes a list of keys, not one string")
        options = {
            "exchange": Exchange(exchange) if isinstance(exchange, str) else exchange,
            "binding_keys": tuple(binding_keys), "headers": dict(headers) if headers is not None else None,
            "match": match, "queue": queue, "codec": codec, "prefetch": prefetch,
            "dead_letter_exchange": dead_letter_exchange, "auto_ack": auto_ack,
            "executor": executor, "processes": processes,
        }  # fmt: skip
        return self._register("subscriber", options, description)

    def worker(
        self,
        queue: str,
        *,
        concurrency: int = 16,
        retry: RetryPolicy | None = None,
        codec: Codec[Any] | None = None,
        queue_spec: Queue | None = None,
        delivery_limit: int = 20,
        events: bool = False,
        event_headers: Sequence[str] = (),
        idempotency: IdempotencyStore | None = None,
        executor: Literal["thread", "process"] | None = None,
        processes: int | None = None,
        consumer_timeout: float | None = None,
        description: str | None = None,
    ) -> Callable[[F], F]:
        """Run tasks from the work queue ``queue`` (a :class:`~amqpkit.WorkQueue` and its :class:`~amqpkit.Worker`).

        ``executor="process"`` runs the handler in ``processes`` pool
        processes (CPU-bound work). Each process imports the handler by name,
        so it must be a module-level function, and it gets only the task's
        value and a :class:`~amqpkit.TaskContext`: a resource or the
        :class:`ServiceContext` lives in the service's process and cannot be
        handed to a pool process. Asking for one is refused here, when the
        handler is declared (:class:`ServiceError`).

        ``consumer_timeout`` (seconds): the queue's own delivery timeout, for
        tasks that may run longer than the node's ``consumer_timeout`` (30
        minutes by default); RabbitMQ 3.12 and later (4.x included) take it as
        the ``x-consumer-timeout`` queue argument. On an older broker the
        node's setting holds, and the service says so when it starts.
        """
        if consumer_timeout is not None and not consumer_timeout > 0:
            raise ValueError(f"consumer_timeout is in seconds and positive, not {consumer_timeout!r}")
        checked_concurrency(concurrency, "a worker's")
        options = {
            "queue": queue, "concurrency": concurrency, "retry": retry, "codec": codec, "queue_spec": queue_spec,
            "delivery_limit": delivery_limit, "events": events, "event_headers": tuple(event_headers),
            "idempotency": idempotency,
            "executor": executor, "processes": processes, "consumer_timeout": consumer_timeout,
        }  # fmt: skip
        return self._register("worker", options, description)

    def rpc(
        self,
        queue: Queue | str,
        method: str | None = None,
        *,
        concurrency: int = 32,
        codec: Codec[Any] | None = None,
        reply_codec: Codec[Any] | None = None,
        executor: Literal["thread", "process"] | None = None,
        processes: int | None = None,
        description: str | None = None,
    ) -> Callable[[F], F]:
        """Serve the function as RPC method ``method`` (default: its name) on the request queue ``queue``.

        Every method on one queue is served by one :class:`~amqpkit.RpcServer`.
        ``executor="process"``: as for :meth:`worker` (a module-level function that
        gets only the request's value; its return value is the reply).
        """
        checked_concurrency(concurrency, "an rpc method's")
        options = {
            "queue": Queue(queue) if isinstance(queue, str) else queue, "method": method,  # durable, as RpcServer's
            "concurrency": concurrency, "codec": codec, "reply_codec": reply_codec,
            "executor": executor, "processes": processes,
        }  # fmt: skip
        return self._register("rpc", options, description)

    def _register(self, kind: HandlerKind, options: dict[str, Any], description: str | None) -> Callable[[F], F]:
        def register(fn: F) -> F:
            if not callable(fn):
                raise TypeError(f"@{kind} decorates a function, not {fn!r}")
            if kind == "rpc" and options["method"] is None:
                options["method"] = getattr(fn, "__name__", None) or "call"
            spec = HandlerSpec(kind, fn, name_of(fn), dict(options), description or first_line(fn))
            if options.get("executor") == "process":
                check_process_handler(spec)
            self.handlers.append(spec)
            return fn

        return register

    @overload
    def publisher(
        self,
        exchange: Exchange | str,
        message: type[T],
        *,
        routing_key: str = "",
        name: str | None = None,
        codec: Codec[T] | None = None,
        persistent: bool = True,
        mandatory: bool = False,
        description: str | None = None,
    ) -> PublisherSpec[T]: ...

    @overload
    def publisher(
        self,
        exchange: Exchange | str,
        message: Any = Any,
        *,
        routing_key: str = "",
        name: str | None = None,
        codec: Codec[Any] | None = None,
        persistent: bool = True,
        mandatory: bool = False,
        description: str | None = None,
    ) -> PublisherSpec[Any]: ...

    def publisher(
        self,
        exchange: Exchange | str,
        message: type[T] | Any = Any,
        *,
        routing_key: str = "",
        name: str | None = None,
        codec: Codec[T] | None = None,
        persistent: bool = True,
        mandatory: bool = False,
        description: str | None = None,
    ) -> PublisherSpec[T]:
        """Declare that the service sends ``message`` values to ``exchange`` (``routing_key``: the usual key)."""
        ex = Exchange(exchange) if isinstance(exchange, str) else exchange
        spec: PublisherSpec[T] = PublisherSpec(
            ex, message, routing_key, name or _channel_name(ex.name or "default", routing_key), codec,
            persistent, mandatory, description,
        )  # fmt: skip
        self.publishers.append(spec)
        return spec

    # ------------------------------------------------------------------ lifespan

    def resource(self, fn: F) -> F:
        """Declare a resource made at startup and closed at shutdown, given to handlers by its type.

        ``fn`` may take a :class:`ServiceContext`. An async generator yields the
        resource once (code after the ``yield`` runs at shutdown); a coroutine
        function or a plain function returns it. Its return annotation names
        the type (``AsyncIterator[Pool]`` or ``Pool``), which handlers ask for.
        Resources start in the order declared and close in reverse.
        """
        self.lifespan.add_resource(fn)
        return fn

    def on_startup(self, fn: F) -> F:
        """Call ``fn`` (or ``fn(ctx)``) after the resources are made, before any handler runs."""
        self.lifespan.startup.append(fn)
        return fn

    def on_shutdown(self, fn: F) -> F:
        """Call ``fn`` (or ``fn(ctx)``) once every handler has stopped, before the resources close."""
        self.lifespan.shutdown.append(fn)
        return fn

    # ------------------------------------------------------------------ checking

    def check(self, settings: BrokerSettings | None = None) -> None:
        """Check every declaration, as at startup, without touching the broker; :class:`ServiceError` if wrong."""
        build_plan(self, Broker(settings or self.settings or BrokerSettings()), None)

    def resource_types(self) -> dict[Any, str]:
        """Each resource type and the name of the function that provides it."""
        return self.lifespan.resolve()

    # ------------------------------------------------------------------ running

    @contextlib.asynccontextmanager
    async def serve(
        self,
        settings: BrokerSettings | str | None = None,
        *,
        broker: Broker | None = None,
        grace: float = 30.0,
        give_up_after: float | None = None,
    ) -> AsyncIterator[RunningService]:
        """Run the service until the block ends, then stop it (handlers get ``grace`` seconds).

        Connects a Broker of its own (``settings``, else the service's, else
        ``AMQP_URL``), or uses ``broker`` (left open). Startup errors raise.
        """
        running = RunningService(self, settings=settings, broker=broker, give_up_after=give_up_after)
        await running.start()
        try:
            yield running
        finally:
            await running.stop(grace=grace)


def _channel_name(*parts: str) -> str:
    return ".".join(p for p in parts if p) or "default"
