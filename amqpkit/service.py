"""A service in one object: its handlers, its resources, one Broker, and a way to run it.

::

    svc = Service("billing", version="1.2.0")
    orders = Exchange("orders", type="topic")
    invoices_out = svc.publisher(Exchange("invoices", type="topic"), Invoice, routing_key="invoice.created")

    @svc.resource
    async def database(ctx: ServiceContext) -> AsyncIterator[Pool]:
        pool = await make_pool()          # at startup
        yield pool
        await pool.close()                # at shutdown

    @svc.subscriber(orders, binding_keys=["order.placed"], queue="billing.orders")
    async def on_order(order: OrderPlaced, ctx: ServiceContext) -> None:
        await ctx.work_queue("billing.invoices").enqueue(order)

    @svc.worker("billing.invoices", concurrency=8)
    async def make_invoice(order: OrderPlaced, db: Pool, ctx: ServiceContext) -> None:
        invoice = await db.insert_invoice(order)
        await ctx.publisher(invoices_out).publish(invoice, routing_key="invoice.created")

    @svc.rpc("billing.rpc")
    async def quote(order: OrderPlaced) -> float: ...

Run it with ``amqpkit run module:svc``, or in-process with
``async with svc.serve(settings) as running: ...``.

Each decorator records a declaration; nothing touches the broker until the
service starts. Then the service builds the existing pattern classes —
:class:`~amqpkit.Subscriber`, :class:`~amqpkit.WorkQueue` and
:class:`~amqpkit.Worker`, :class:`~amqpkit.RpcServer` (one per request
queue, holding every method on it), :class:`~amqpkit.Publisher` — through
their public constructors, on one :class:`~amqpkit.Broker`, which restores
all of it after a reconnect as it does for each class used alone.

A handler's first parameter takes the message (``X`` or ``Delivery[X]``, as
for the classes). Any other parameter is filled by its annotation:

- :class:`ServiceContext`: the running service (its broker, resources, publishers, work queues);
- a type a ``@svc.resource`` provides: that resource;
- :class:`~amqpkit.TaskContext` (workers only): the task's context;
- a parameter with a default is left alone.

Anything else is an error at startup, as is an annotation that does not
resolve, two handlers on one queue, or one name declared twice with
different specs (:class:`ServiceError`, naming both). A worker on the
process executor gets the message and a TaskContext only: asking for more
is refused already by its decorator.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import sys
import typing
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, cast

from .codec import Codec, codec_for
from .connection import Broker
from .context import TaskContext
from .errors import AmqpkitError
from .message import Delivery
from .patterns.pubsub import Publisher, Subscriber
from .patterns.rpc import RpcServer
from .patterns.work_queue import (
    CONSUMER_TIMEOUT_ARG,
    PER_QUEUE_CONSUMER_TIMEOUT,
    IdempotencyStore,
    RetryPolicy,
    Worker,
    WorkQueue,
)
from .settings import BrokerSettings
from .topology import Binding, Exchange, Queue

__all__ = [
    "HandlerSpec",
    "PublisherSpec",
    "RunningService",
    "Service",
    "ServiceContext",
    "ServiceError",
    "load_service",
]

log = logging.getLogger("amqpkit.service")

T = TypeVar("T")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

HandlerKind = Literal["subscriber", "worker", "rpc"]


class ServiceError(AmqpkitError):
    """A service's declarations do not add up (a conflict, a parameter nothing fills, an unresolvable annotation)."""


# ---------------------------------------------------------------------- declarations


@dataclass(frozen=True, eq=False)
class PublisherSpec(Generic[T]):
    """A publisher the service sends on, declared for the AsyncAPI document and for reuse.

    Get the live :class:`~amqpkit.Publisher` in a handler with ``ctx.publisher(spec)``.
    """

    exchange: Exchange
    message: Any
    routing_key: str
    name: str
    codec: Codec[T] | None
    persistent: bool
    mandatory: bool
    description: str | None


@dataclass(eq=False)
class HandlerSpec:
    """One decorated handler: what kind, the function, the pattern's options, and what its signature asks for."""

    kind: HandlerKind
    fn: Callable[..., Any]
    name: str  # module:qualname, as in log lines
    options: dict[str, Any]
    description: str | None = None
    # Filled by Service.check():
    message_type: Any = Any
    returns: Any = Any
    wants_delivery: bool = False
    injected: dict[str, Any] = field(default_factory=dict)  # parameter -> ServiceContext or a resource type
    task_context: list[str] = field(default_factory=list)

    @property
    def short_name(self) -> str:
        return getattr(self.fn, "__name__", self.name.rsplit(":", 1)[-1])

    @property
    def codec(self) -> Codec[Any]:
        """The codec of the message: the one given, else the annotation's (as the patterns choose it)."""
        given = self.options.get("codec")
        return given if given is not None else codec_for(self.message_type)

    @property
    def reply_codec(self) -> Codec[Any]:
        """An RPC method's reply codec, chosen as :meth:`RpcServer.add` chooses it."""
        given = self.options.get("reply_codec")
        if given is not None:
            return cast("Codec[Any]", given)
        if self.returns in (Any, None, type(None)):
            return self.codec
        return codec_for(self.returns)


@dataclass(eq=False)
class _Resource:
    fn: Callable[..., Any]
    provides: Any
    name: str


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
        self._resources: list[_Resource] = []
        self._startup: list[Callable[..., Any]] = []
        self._shutdown: list[Callable[..., Any]] = []

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
        description: str | None = None,
    ) -> Callable[[F], F]:
        """Handle messages from ``exchange`` (a :class:`~amqpkit.Subscriber`; see it for each option).

        ``queue=None``: a private queue per running instance (every instance
        sees every message); a name: a shared durable queue (instances share the work).
        """
        if isinstance(binding_keys, str):
            raise TypeError("binding_keys takes a list of keys, not one string")
        options = {
            "exchange": Exchange(exchange) if isinstance(exchange, str) else exchange,
            "binding_keys": tuple(binding_keys), "headers": dict(headers) if headers is not None else None,
            "match": match, "queue": queue, "codec": codec, "prefetch": prefetch,
            "dead_letter_exchange": dead_letter_exchange, "auto_ack": auto_ack,
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
        options = {
            "queue": queue, "concurrency": concurrency, "retry": retry, "codec": codec, "queue_spec": queue_spec,
            "delivery_limit": delivery_limit, "events": events, "idempotency": idempotency,
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
        description: str | None = None,
    ) -> Callable[[F], F]:
        """Serve the function as RPC method ``method`` (default: its name) on the request queue ``queue``.

        Every method on one queue is served by one :class:`~amqpkit.RpcServer`.
        """
        options = {
            "queue": Queue(queue) if isinstance(queue, str) else queue, "method": method,  # durable, as RpcServer's
            "concurrency": concurrency, "codec": codec, "reply_codec": reply_codec,
        }  # fmt: skip
        return self._register("rpc", options, description)

    def _register(self, kind: HandlerKind, options: dict[str, Any], description: str | None) -> Callable[[F], F]:
        def register(fn: F) -> F:
            if not callable(fn):
                raise TypeError(f"@{kind} decorates a function, not {fn!r}")
            if kind == "rpc" and options["method"] is None:
                options["method"] = getattr(fn, "__name__", None) or "call"
            spec = HandlerSpec(kind, fn, _name_of(fn), dict(options), description or _first_line(fn))
            if options.get("executor") == "process":
                _check_process_handler(spec)
            self.handlers.append(spec)
            return fn

        return register

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
        self._resources.append(_Resource(fn, None, _name_of(fn)))
        return fn

    def on_startup(self, fn: F) -> F:
        """Call ``fn`` (or ``fn(ctx)``) after the resources are made, before any handler runs."""
        self._startup.append(fn)
        return fn

    def on_shutdown(self, fn: F) -> F:
        """Call ``fn`` (or ``fn(ctx)``) once every handler has stopped, before the resources close."""
        self._shutdown.append(fn)
        return fn

    # ------------------------------------------------------------------ checking

    def check(self, settings: BrokerSettings | None = None) -> None:
        """Check every declaration, as at startup, without touching the broker; :class:`ServiceError` if wrong."""
        self._plan(Broker(settings or self.settings or BrokerSettings()), None)

    def resource_types(self) -> dict[Any, str]:
        """Each resource type and the name of the function that provides it."""
        self._resolve_resources()
        return {r.provides: r.name for r in self._resources}

    def _resolve_resources(self) -> None:
        seen: dict[Any, str] = {}
        for res in self._resources:
            hints = _hints(res.fn, f"resource {res.name}")
            provides = hints.get("return")
            if provides is None:
                raise ServiceError(f"resource {res.name} must say what it provides in its return annotation")
            if inspect.isasyncgenfunction(res.fn) or typing.get_origin(provides) in _ITERATORS:
                args = typing.get_args(provides)
                if not args:
                    raise ServiceError(f"resource {res.name}: say what it yields, e.g. AsyncIterator[Pool]")
                provides = args[0]
            if provides in (Any, None, type(None), ServiceContext, TaskContext):
                raise ServiceError(f"resource {res.name} must provide a type of its own, not {provides!r}")
            if provides in seen:
                raise ServiceError(f"resources {seen[provides]} and {res.name} both provide {_type_name(provides)}")
            seen[provides] = res.name
            res.provides = provides

    def _inspect(self, spec: HandlerSpec, resources: Mapping[Any, str]) -> None:
        """Read what ``spec``'s signature asks for; ServiceError for what nothing can fill."""
        what = f"{spec.kind} {spec.name}"
        hints = _hints(spec.fn, what)
        try:
            signature = inspect.signature(spec.fn)
        except (TypeError, ValueError) as exc:
            raise ServiceError(f"{what}: cannot read its signature: {exc}") from None
        params = list(signature.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional:
            raise ServiceError(f"{what} must take the message as its first parameter")
        first = positional[0]
        annotation = hints.get(first.name, Any)
        if annotation is ServiceContext or annotation is TaskContext or annotation in resources:
            raise ServiceError(f"{what}: the message comes first, then {_type_name(annotation)}")
        spec.wants_delivery = annotation is Delivery or typing.get_origin(annotation) is Delivery
        if spec.wants_delivery:
            args = typing.get_args(annotation)
            annotation = args[0] if args else bytes
        spec.message_type = annotation
        spec.returns = hints.get("return", Any)
        spec.injected, spec.task_context = {}, []
        for p in params:
            if p is first or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            wanted = hints.get(p.name, inspect.Parameter.empty)
            if wanted is ServiceContext or wanted in resources:
                if p.kind is p.POSITIONAL_ONLY:
                    raise ServiceError(f"{what}: parameter {p.name!r} is positional-only; make it a normal one")
                spec.injected[p.name] = wanted
            elif wanted is TaskContext:
                if spec.kind != "worker":
                    raise ServiceError(f"{what}: only worker handlers get a TaskContext (parameter {p.name!r})")
                spec.task_context.append(p.name)
            elif p.default is inspect.Parameter.empty:
                known = ", ".join(sorted(_type_name(t) for t in resources)) or "none declared"
                shown = "no annotation" if wanted is inspect.Parameter.empty else _type_name(wanted)
                raise ServiceError(
                    f"{what}: nothing fills parameter {p.name!r} ({shown}); a handler may ask for the message, "
                    f"ServiceContext, TaskContext (workers) or a resource of the service ({known})"
                )
        if spec.options.get("executor") == "process":
            if spec.injected:  # declared before a check could see the annotations resolve (see _check_process_handler)
                shown = ", ".join(f"{n} ({_type_name(t)})" for n, t in spec.injected.items())
                raise ServiceError(_process_refusal(spec, shown))
            found = _found_by_name(spec.fn)
            if found is not None:
                raise ServiceError(
                    f"worker {spec.name} runs in pool processes (executor='process'), which find the handler by its "
                    f"name, and {found}. Make it a module-level function, with @svc.worker as its outermost decorator"
                )

    # ------------------------------------------------------------------ building

    def _plan(self, broker: Broker, running: RunningService | None) -> _Plan:
        """Check the declarations and build the pattern objects on ``broker`` (nothing is sent to it)."""
        self._resolve_resources()
        resources = {r.provides: r.name for r in self._resources}
        for spec in self.handlers:
            self._inspect(spec, resources)
        plan = _Plan(self, broker)
        for spec in self.handlers:
            fn = _bind(spec, running)
            if spec.kind == "subscriber":
                o = spec.options
                sub: Subscriber[Any] = Subscriber(
                    broker, o["exchange"], fn, binding_keys=o["binding_keys"], headers=o["headers"], match=o["match"],
                    queue=o["queue"], codec=o["codec"], prefetch=o["prefetch"],
                    dead_letter_exchange=o["dead_letter_exchange"], auto_ack=o["auto_ack"],
                    on_error=plan.on_error(spec),
                )  # fmt: skip
                plan.subscribers.append((spec, sub))
            elif spec.kind == "worker":
                o = spec.options
                work: WorkQueue[Any] = WorkQueue(
                    broker, o["queue"], o["codec"], retry=o["retry"], queue=o["queue_spec"],
                    delivery_limit=o["delivery_limit"], events=o["events"], consumer_timeout=o["consumer_timeout"],
                )  # fmt: skip
                extra: dict[str, Any] = {}
                if o["executor"] is not None:
                    extra["executor"] = o["executor"]
                if o["processes"] is not None:
                    extra["processes"] = o["processes"]
                w: Worker[Any] = Worker(
                    work, fn, concurrency=o["concurrency"], idempotency=o["idempotency"],
                    on_error=plan.on_error(spec), **extra,
                )  # fmt: skip
                plan.workers.append((spec, work, w))
            else:
                plan.add_method(spec, fn)
        for pub in self.publishers:
            plan.publishers.append((pub, Publisher(broker, pub.exchange, pub.codec, persistent=pub.persistent,
                                                   mandatory=pub.mandatory)))  # fmt: skip
        plan.check_conflicts()
        return plan

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


# What typing.get_origin() gives for AsyncIterator[X], AsyncGenerator[X, None], Iterator[X], Generator[X, ...].
_ITERATORS = (AsyncIterator, AsyncGenerator, Iterator, Generator)


@dataclass(eq=False)
class _Method:
    spec: HandlerSpec
    fn: Callable[..., Any]


class _Plan:
    """The pattern objects a service is made of, on one broker."""

    def __init__(self, service: Service, broker: Broker) -> None:
        self.service = service
        self.broker = broker
        self.subscribers: list[tuple[HandlerSpec, Subscriber[Any]]] = []
        self.workers: list[tuple[HandlerSpec, WorkQueue[Any], Worker[Any]]] = []
        self.servers: dict[str, tuple[RpcServer, list[HandlerSpec]]] = {}
        self.publishers: list[tuple[PublisherSpec[Any], Publisher[Any]]] = []
        self.failures: list[tuple[str, BaseException]] = []
        self.failure_callbacks: list[Callable[[str, BaseException], None]] = []

    def on_error(self, spec: HandlerSpec | str) -> Callable[[BaseException], None]:
        label = spec if isinstance(spec, str) else f"{spec.kind} {spec.name}"

        def failed(exc: BaseException) -> None:
            self.failures.append((label, exc))
            for callback in list(self.failure_callbacks):
                callback(label, exc)

        return failed

    def add_method(self, spec: HandlerSpec, fn: Callable[..., Any]) -> None:
        queue: Queue = spec.options["queue"]
        entry = self.servers.get(queue.name)
        if entry is None:
            server = RpcServer(
                self.broker, queue, concurrency=spec.options["concurrency"], on_error=self.on_error(f"rpc {queue.name}")
            )
            entry = self.servers[queue.name] = (server, [])
        server, specs = entry
        for other in specs:
            if other.options["method"] == spec.options["method"]:
                raise ServiceError(
                    f"rpc {other.name} and rpc {spec.name} both serve method {spec.options['method']!r} "
                    f"on queue {queue.name!r}"
                )
            if other.options["queue"] != queue:
                raise ServiceError(
                    f"rpc {other.name} and rpc {spec.name} declare the request queue {queue.name!r} differently: "
                    f"{_describe_queue(other.options['queue'])} against {_describe_queue(queue)}"
                )
            if other.options["concurrency"] != spec.options["concurrency"]:
                raise ServiceError(
                    f"rpc {other.name} and rpc {spec.name} share the request queue {queue.name!r} but ask for "
                    f"concurrency {other.options['concurrency']} and {spec.options['concurrency']}"
                )
        server.add(spec.options["method"], fn, codec=spec.options["codec"], reply_codec=spec.options["reply_codec"])
        specs.append(spec)

    def consumed(self) -> Iterator[tuple[str, Queue]]:
        """(who, queue spec) for every queue a handler of this service consumes."""
        for spec, sub in self.subscribers:
            yield f"subscriber {spec.name}", sub.queue
        for spec, work, _ in self.workers:
            yield f"worker {spec.name}", work.queue
        for name, (server, specs) in self.servers.items():
            yield f"rpc {', '.join(s.name for s in specs)}" if specs else f"rpc {name}", server.queue

    def declared(self) -> Iterator[tuple[str, Queue]]:
        """Every named queue the service declares, with who declares it (work queues bring their DLQ)."""
        yield from self.consumed()
        for spec, work, _ in self.workers:
            yield f"worker {spec.name} (its dead-letter queue)", work.dlq

    def exchanges(self) -> Iterator[tuple[str, Exchange]]:
        for spec, sub in self.subscribers:
            yield f"subscriber {spec.name}", sub.exchange
        for pub, _ in self.publishers:
            yield f"publisher {pub.name}", pub.exchange

    def bindings(self) -> Iterator[Binding]:
        for _, sub in self.subscribers:
            yield from sub.bindings

    def check_conflicts(self) -> None:
        consumers: dict[str, str] = {}
        for who, queue in self.consumed():
            if queue.server_named:
                continue
            if queue.name in consumers:
                raise ServiceError(
                    f"{consumers[queue.name]} and {who} both consume queue {queue.name!r}: "
                    "one queue, one handler (instances of a service share a queue by running the service twice)"
                )
            consumers[queue.name] = who
        specs: dict[str, tuple[str, Queue]] = {}
        for who, queue in self.declared():
            if queue.server_named:
                continue
            seen = specs.get(queue.name)
            if seen is not None and seen[1] != queue:
                raise ServiceError(
                    f"{seen[0]} and {who} declare queue {queue.name!r} differently: "
                    f"{_describe_queue(seen[1])} against {_describe_queue(queue)}"
                )
            specs.setdefault(queue.name, (who, queue))
        exchanges: dict[str, tuple[str, Exchange]] = {}
        for who, ex in self.exchanges():
            if ex.is_builtin:
                continue
            seen_ex = exchanges.get(ex.name)
            if seen_ex is not None and _exchange_key(seen_ex[1]) != _exchange_key(ex):
                raise ServiceError(
                    f"{seen_ex[0]} and {who} declare exchange {ex.name!r} differently: "
                    f"{_describe_exchange(seen_ex[1])} against {_describe_exchange(ex)}"
                )
            exchanges.setdefault(ex.name, (who, ex))


# ---------------------------------------------------------------------- the running service


class ServiceContext:
    """What a handler of a running service may ask for: ``ctx: ServiceContext``.

    ``broker``, ``service``, :meth:`get` (a resource by its type),
    :meth:`publisher` (the live publisher of a declared :class:`PublisherSpec`),
    :meth:`work_queue` (the work queue of one of the service's workers, to
    enqueue tasks) and ``state``, a dict for what startup hooks want to share.
    """

    def __init__(self, running: RunningService) -> None:
        self._running = running
        self.state: dict[str, Any] = {}

    @property
    def service(self) -> Service:
        return self._running.service

    @property
    def broker(self) -> Broker:
        return self._running.broker

    def get(self, kind: type[R]) -> R:
        """The resource of type ``kind`` (made at startup); KeyError if the service has none."""
        try:
            return cast(R, self._running.resources[kind])
        except KeyError:
            raise KeyError(f"service {self.service.name} has no resource of type {_type_name(kind)}") from None

    def publisher(self, spec: PublisherSpec[T]) -> Publisher[T]:
        """The live :class:`~amqpkit.Publisher` for a publisher the service declared."""
        plan = self._running.plan
        for declared, pub in plan.publishers if plan is not None else ():
            if declared is spec:
                return cast("Publisher[T]", pub)
        raise KeyError(f"publisher {spec.name} is not declared by service {self.service.name}")

    def work_queue(self, name: str) -> WorkQueue[Any]:
        """The :class:`~amqpkit.WorkQueue` of this service's worker on ``name`` (to ``enqueue`` tasks)."""
        plan = self._running.plan
        for _, work, _ in plan.workers if plan is not None else ():
            if work.name == name:
                return work
        raise KeyError(f"service {self.service.name} has no worker on {name!r}")

    def __repr__(self) -> str:
        return f"<ServiceContext of {self.service.name}>"


class RunningService:
    """A started service: its Broker, its pattern objects, its resources, and whether it is ready.

    Ready means: started, connected, and no handler's consumer lost for good.
    When a consumer cannot be restored (its queue deleted and not ours to
    declare again, or declared again by someone else with other arguments)
    or a declared exchange, queue or binding cannot be restored after a
    reconnect, the service has *failed*: :attr:`error` says why and
    :meth:`wait_failed` returns. ``give_up_after``: seconds without a
    connection after which the service fails too (None: keep trying).
    """

    def __init__(
        self,
        service: Service,
        *,
        settings: BrokerSettings | str | None = None,
        broker: Broker | None = None,
        give_up_after: float | None = None,
    ) -> None:
        self.service = service
        self._own_broker = broker is None
        if broker is None:
            if isinstance(settings, str):
                settings = BrokerSettings(url=settings)
            broker = Broker(settings or service.settings or BrokerSettings.from_env())
        self.broker = broker
        self.give_up_after = give_up_after
        self.context = ServiceContext(self)
        self.resources: dict[Any, Any] = {}
        self.plan: _Plan | None = None
        self.error: str | None = None
        self.started = False
        self._failed = asyncio.Event()
        self._changed: list[Callable[[], None]] = []
        self._stack = contextlib.AsyncExitStack()
        self._unsubscribe: list[Callable[[], None]] = []
        self._outage: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------------ state

    @property
    def ready(self) -> bool:
        return self.readiness()[0]

    def readiness(self) -> tuple[bool, str | None]:
        """(ready, why not)."""
        if self.error is not None:
            return False, self.error
        if self._stopping:
            return False, "stopping"
        if not self.started:
            return False, "starting"
        if not self.broker.is_connected:
            return False, "not connected to the broker (reconnecting)"
        detached = self.broker.detached_consumers()
        if detached:
            return False, f"consumers not attached: {', '.join(sorted(detached))}"
        return True, None

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` whenever readiness may have changed; returns a function that unregisters it."""
        self._changed.append(callback)
        return lambda: self._changed.remove(callback) if callback in self._changed else None

    def _notify(self) -> None:
        for callback in list(self._changed):
            try:
                callback()
            except Exception:
                log.exception("readiness callback failed")

    async def wait_failed(self) -> str:
        """Wait until the service fails; the reason."""
        await self._failed.wait()
        assert self.error is not None
        return self.error

    def fail(self, reason: str) -> None:
        """Mark the service failed (the runner then stops it and exits non-zero)."""
        if self.error is None:
            self.error = reason
            log.error("service %s failed: %s", self.service.name, reason)
        self._failed.set()
        self._notify()

    @property
    def failures(self) -> list[tuple[str, BaseException]]:
        """Each handler that stopped for good (its consumer could not be restored), and why."""
        return list(self.plan.failures) if self.plan else []

    @property
    def subscribers(self) -> dict[str, Subscriber[Any]]:
        """The running :class:`~amqpkit.Subscriber` of each subscriber handler, by handler name."""
        return {spec.name: sub for spec, sub in self.plan.subscribers} if self.plan else {}

    @property
    def workers(self) -> dict[str, Worker[Any]]:
        """The running :class:`~amqpkit.Worker` of each worker handler, by handler name."""
        return {spec.name: w for spec, _, w in self.plan.workers} if self.plan else {}

    @property
    def rpc_servers(self) -> dict[str, RpcServer]:
        """The running :class:`~amqpkit.RpcServer` of each request queue, by queue name."""
        return {name: server for name, (server, _) in self.plan.servers.items()} if self.plan else {}

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> None:
        """Check, connect, make the resources, run the startup hooks, declare and start every handler."""
        service = self.service
        plan = service._plan(self.broker, self)  # checks first: nothing is touched if a declaration is wrong
        self.plan = plan
        try:
            if self._own_broker:
                await self.broker.connect()
            self._unsubscribe.append(self.broker.on_topology_error(self._topology_failed))
            self._unsubscribe.append(self.broker.on_disconnect(self._disconnected))
            self._unsubscribe.append(self.broker.on_reconnect(self._reconnected))
            plan.failure_callbacks.append(lambda who, exc: self.fail(f"{who} stopped: {exc}"))
            for res in service._resources:
                self.resources[res.provides] = await self._enter(res)
            for hook in service._startup:
                await _call_hook(hook, self.context)
            for _, pub in plan.publishers:
                await pub.declare()
            for server, _ in plan.servers.values():
                await server.start()
            for _, _, w in plan.workers:
                await w.start()
            for _, sub in plan.subscribers:
                await sub.start()
        except BaseException:
            await self._teardown(grace=0)
            raise
        self.started = True
        log.info("service %s %s started: %s", service.name, service.version, self.describe())
        self._notify()

    async def _enter(self, res: _Resource) -> Any:
        fn = res.fn
        args = (self.context,) if _takes_argument(fn) else ()
        if inspect.isasyncgenfunction(fn):
            return await self._stack.enter_async_context(contextlib.asynccontextmanager(fn)(*args))
        if inspect.isgeneratorfunction(fn):
            return self._stack.enter_context(contextlib.contextmanager(fn)(*args))
        value = fn(*args)
        if inspect.isawaitable(value):
            value = await value
        return value

    def describe(self) -> str:
        plan = self.plan
        if plan is None:
            return "nothing"
        parts = [f"subscriber on {sub.exchange.name or '(default)'!r}" for _, sub in plan.subscribers]
        parts += [f"worker on {work.name!r}{_timeout_note(work, self.broker)}" for _, work, _ in plan.workers]
        parts += [f"rpc on {name!r} ({', '.join(s.options['method'] for s in specs)})"
                  for name, (_, specs) in plan.servers.items()]  # fmt: skip
        return "; ".join(parts) or "no handlers"

    async def stop(self, *, grace: float = 30.0) -> None:
        """Stop taking messages, give running handlers ``grace`` seconds, requeue the rest, then clean up."""
        if self._stopping:
            return
        self._stopping = True
        self._notify()
        await self._teardown(grace=grace)
        log.info("service %s stopped", self.service.name)

    async def _teardown(self, *, grace: float) -> None:
        plan = self.plan
        if plan is not None:
            stops: list[Awaitable[None]] = [sub.stop(grace=grace) for _, sub in plan.subscribers]
            stops += [w.stop(grace) for _, _, w in plan.workers]
            stops += [server.stop(grace=grace) for server, _ in plan.servers.values()]
            results = await asyncio.gather(*stops, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    log.warning("stopping a handler of %s: %s", self.service.name, result)
        if self.started:
            for hook in self.service._shutdown:
                try:
                    await _call_hook(hook, self.context)
                except Exception:
                    log.exception("shutdown hook %s failed", _name_of(hook))
        try:
            await self._stack.aclose()
        except Exception:
            log.exception("closing the resources of %s failed", self.service.name)
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        if self._outage is not None:
            self._outage.cancel()
        if self._own_broker:
            await self.broker.close(grace=0)

    # ------------------------------------------------------------------ what the broker tells

    def _topology_failed(self, spec: Exchange | Queue | Binding, exc: BaseException) -> None:
        self.fail(f"could not restore {_describe_spec(spec)} after a reconnect: {exc}")

    def _disconnected(self, exc: BaseException) -> None:
        self._notify()
        if self.give_up_after is not None and (self._outage is None or self._outage.done()):
            self._outage = asyncio.get_running_loop().create_task(self._watch_outage(self.give_up_after))

    async def _watch_outage(self, limit: float) -> None:
        try:
            await self.broker.wait_connected(timeout=limit)
        except TimeoutError:
            if not self._stopping:
                self.fail(f"the broker was unreachable for {limit:g} s (--give-up-after)")

    async def _reconnected(self) -> None:
        self._notify()


# ---------------------------------------------------------------------- binding handlers to a running service


def _bind(spec: HandlerSpec, running: RunningService | None) -> Callable[..., Any]:
    """The function given to the pattern: ``spec.fn`` itself, or a wrapper that fills the injected parameters.

    A handler on the process executor always goes as itself: the pool pickles
    it by name, and a wrapper made here could not be found by that name in a
    pool process. Such a handler never asks for anything injected
    (:func:`_check_process_handler`, and :meth:`Service._inspect` again).
    """
    fn = spec.fn
    if not spec.injected or spec.options.get("executor") == "process":
        return fn
    injected = dict(spec.injected)

    def arguments() -> dict[str, Any]:
        if running is None:
            raise RuntimeError(f"{spec.name} was called outside a running service")
        return {
            name: running.context if wanted is ServiceContext else running.resources[wanted]
            for name, wanted in injected.items()
        }

    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(fn):

        async def call_async(message: Any, **kwargs: Any) -> Any:
            return await fn(message, **kwargs, **arguments())

        wrapper = call_async
    else:

        def call_sync(message: Any, **kwargs: Any) -> Any:
            return fn(message, **kwargs, **arguments())

        wrapper = call_sync
    functools.update_wrapper(wrapper, fn)  # name, module, docs, and __wrapped__ for the watchdog's reports
    message_annotation = Delivery[spec.message_type] if spec.wants_delivery else spec.message_type  # type: ignore[name-defined]
    params = [inspect.Parameter("message", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=message_annotation)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=TaskContext) for n in spec.task_context]
    annotations: dict[str, Any] = {"message": message_annotation, **dict.fromkeys(spec.task_context, TaskContext)}
    annotations["return"] = spec.returns
    cast(Any, wrapper).__signature__ = inspect.Signature(params, return_annotation=spec.returns)
    wrapper.__annotations__ = annotations
    return wrapper


async def _call_hook(hook: Callable[..., Any], ctx: ServiceContext) -> None:
    result = hook(ctx) if _takes_argument(hook) else hook()
    if inspect.isawaitable(result):
        await result


def _takes_argument(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


# ---------------------------------------------------------------------- loading


def load_service(spec: str) -> Service:
    """``package.module:attr`` -> the :class:`Service` there; :class:`ServiceError` with a one-line reason if not.

    The current directory is on the import path, as for ``python -m``.
    """
    import importlib
    import os

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ServiceError(f"expected MODULE:ATTR (e.g. myapp.service:svc), not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ServiceError as exc:  # a declaration refused while the module was imported: that is the news
        raise ServiceError(f"{module_name}: {exc}") from None
    except Exception as exc:  # any error while importing the user's module is reported, in one line
        raise ServiceError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ServiceError(f"{module_name!r} has no {attr!r}") from None
    if not isinstance(value, Service):
        raise ServiceError(f"{spec} is a {type(value).__name__}, not an amqpkit Service")
    return value


# ---------------------------------------------------------------------- helpers


def _check_process_handler(spec: HandlerSpec) -> None:
    """Refuse, when it is declared, a worker handler the process executor cannot run (:class:`ServiceError`).

    A pool process imports the handler by name and gets the task's value and,
    if asked for, a :class:`~amqpkit.TaskContext` (its reports travel back).
    Nothing else crosses: not a resource, not the :class:`ServiceContext`,
    not the ``Delivery`` (settling it happens in the service's process).
    Annotations that do not resolve yet are read as written; :meth:`Service.check`
    looks again once they do.
    """
    fn = spec.fn
    what = f"worker {spec.name} runs in pool processes (executor='process')"
    if "<locals>" in (getattr(fn, "__qualname__", None) or "") or getattr(fn, "__name__", None) == "<lambda>":
        raise ServiceError(f"{what}, which import it by name: make it a module-level function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # Service.check says why
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # a name defined further down the module: read the annotation as written
        hints = {}
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        return  # Service.check says why
    first = positional[0]
    annotation = hints.get(first.name, first.annotation)
    if annotation is Delivery or typing.get_origin(annotation) is Delivery or _written_as(annotation, "Delivery"):
        raise ServiceError(
            f"{what}: it gets the task's value, not the Delivery (the delivery is settled in the service's process)"
        )
    refused = []
    for p in params:
        if p is first or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        wanted = hints.get(p.name, p.annotation)
        if wanted is TaskContext or _written_as(wanted, "TaskContext"):
            continue
        if wanted is p.empty:
            refused.append(p.name)
        else:
            refused.append(f"{p.name} ({wanted if isinstance(wanted, str) else _type_name(wanted)})")
    if refused:
        raise ServiceError(_process_refusal(spec, ", ".join(refused)))


def _timeout_note(work: WorkQueue[Any], broker: Broker) -> str:
    """How a work queue's own consumer_timeout stands, for the line a started service logs ('' if none asked)."""
    if work.consumer_timeout is None:
        return ""
    version = broker.server_version
    if CONSUMER_TIMEOUT_ARG in work.queue.arguments or not version or version >= PER_QUEUE_CONSUMER_TIMEOUT:
        return f" (consumer_timeout {work.consumer_timeout:g} s)"
    shown = ".".join(map(str, version))
    return f" (consumer_timeout {work.consumer_timeout:g} s not applied: RabbitMQ {shown} has only the node's)"


def _found_by_name(fn: Any) -> str | None:
    """Why a pool process would not find function ``fn`` by its module and name (None: it would, or not a function)."""
    if not inspect.isfunction(fn):
        return None  # a callable object or a partial is sent as itself, not by name
    module = sys.modules.get(fn.__module__)
    target: Any = module
    for part in fn.__qualname__.split("."):
        target = getattr(target, part, None)
    if target is fn:
        return None
    if target is None:
        return f"{fn.__module__}.{fn.__qualname__} names nothing"
    return f"{fn.__module__}.{fn.__qualname__} is another object (a decorator over @svc.worker?)"


def _process_refusal(spec: HandlerSpec, what: str) -> str:
    return (
        f"worker {spec.name} runs in pool processes (executor='process'): it cannot be given {what}. "
        "Resources and the ServiceContext live in the service's process and do not cross to a pool process; "
        "a process handler gets the task's value and, if it asks, a TaskContext. Leave executor='process' off "
        "(a plain def then runs in a thread, with its resources), or move what needs them to another handler"
    )


def _written_as(annotation: Any, name: str) -> bool:
    """A string annotation names ``name`` (``"TaskContext"``, ``"amqpkit.TaskContext"``, ``"Delivery[X]"``)."""
    return isinstance(annotation, str) and annotation.split("[", 1)[0].strip().rsplit(".", 1)[-1] == name


def _hints(fn: Callable[..., Any], what: str) -> dict[str, Any]:
    """``fn``'s resolved annotations; ServiceError naming ``what`` if one does not resolve."""
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(type(fn), "__call__", fn)  # noqa: B004
    try:
        return typing.get_type_hints(target)
    except Exception as exc:  # NameError for a name that is not defined, and whatever else an annotation raises
        raise ServiceError(f"{what}: an annotation cannot be resolved: {type(exc).__name__}: {exc}") from None


def _name_of(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{qualname}"


def _first_line(fn: Any) -> str | None:
    doc = inspect.getdoc(fn)
    return doc.strip().splitlines()[0] if doc else None


def _type_name(t: Any) -> str:
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)


def _channel_name(*parts: str) -> str:
    return ".".join(p for p in parts if p) or "default"


def _describe_queue(q: Queue) -> str:
    args = q.declare_arguments()
    shown = ", ".join(f"{k}={v}" for k, v in sorted(args.items()))
    flags = [f for f, on in (("durable", q.durable), ("exclusive", q.exclusive), ("auto-delete", q.auto_delete)) if on]
    return f"({', '.join([str(q.type), *flags, *([shown] if shown else [])])})"


def _exchange_key(ex: Exchange) -> tuple[Any, ...]:
    return (ex.type, ex.durable, ex.auto_delete, ex.internal, tuple(sorted(ex.arguments.items())))


def _describe_exchange(ex: Exchange) -> str:
    flags = [f for f, on in (("durable", ex.durable), ("auto-delete", ex.auto_delete), ("internal", ex.internal)) if on]
    return f"({', '.join([str(ex.type), *flags])})"


def _describe_spec(spec: Exchange | Queue | Binding) -> str:
    if isinstance(spec, Exchange):
        return f"exchange {spec.name!r}"
    if isinstance(spec, Queue):
        return f"queue {spec.name or '(server-named)'!r}"
    return f"the binding of {spec.queue.name or '(server-named)'!r} to {spec.exchange.name!r}"
