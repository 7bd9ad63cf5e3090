"""The pattern objects a service is made of, built from its declarations on one Broker (nothing is sent).

:func:`build_plan` checks every declaration (the resources, each handler's
signature) and builds a :class:`~amqpkit.Subscriber`, a
:class:`~amqpkit.WorkQueue` and :class:`~amqpkit.Worker`, one
:class:`~amqpkit.RpcServer` per request queue and a
:class:`~amqpkit.Publisher` per declared publisher; then refuses two handlers
on one queue and one name declared twice with different specs. The running
service starts what it built; ``Service.check()`` and the AsyncAPI document
only build it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..connection import Broker
from ..patterns.pubsub import Publisher, Subscriber
from ..patterns.rpc import RpcServer
from ..patterns.work_queue import Worker, WorkQueue
from ..topology import Binding, Exchange, Queue
from .handlers import bind_handler, inspect_handler
from .specs import HandlerSpec, PublisherSpec, ServiceError

if TYPE_CHECKING:
    from .decorators import Service
    from .running import RunningService


def build_plan(service: Service, broker: Broker, running: RunningService | None) -> Plan:
    """Check ``service``'s declarations and build its pattern objects on ``broker`` (nothing is sent to it).

    ``running``: the service whose resources and context the handlers get (None: build only, to check or
    to document).
    """
    resources = service.lifespan.resolve()
    for spec in service.handlers:
        inspect_handler(spec, resources)
    plan = Plan(broker)
    for spec in service.handlers:
        fn = bind_handler(spec, running)
        if spec.kind == "subscriber":
            o = spec.options
            sub: Subscriber[Any] = Subscriber(
                broker, o["exchange"], fn, binding_keys=o["binding_keys"], headers=o["headers"], match=o["match"],
                queue=o["queue"], codec=o["codec"], prefetch=o["prefetch"],
                dead_letter_exchange=o["dead_letter_exchange"], auto_ack=o["auto_ack"],
                on_error=plan.on_error(spec), executor=o["executor"], processes=o["processes"],
            )  # fmt: skip
            plan.subscribers.append((spec, sub))
        elif spec.kind == "worker":
            o = spec.options
            work: WorkQueue[Any] = WorkQueue(
                broker, o["queue"], o["codec"], retry=o["retry"], queue=o["queue_spec"],
                delivery_limit=o["delivery_limit"], events=o["events"], event_headers=o["event_headers"],
                consumer_timeout=o["consumer_timeout"],
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
    for pub in service.publishers:
        plan.publishers.append((pub, Publisher(broker, pub.exchange, pub.codec, persistent=pub.persistent,
                                               mandatory=pub.mandatory)))  # fmt: skip
    plan.check_conflicts()
    return plan


class Plan:
    """The pattern objects a service is made of, on one broker, and the handlers that stopped for good."""

    def __init__(self, broker: Broker) -> None:
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
        o = spec.options
        server.add(
            o["method"], fn, codec=o["codec"], reply_codec=o["reply_codec"], executor=o["executor"],
            processes=o["processes"],
        )  # fmt: skip
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


def _describe_queue(q: Queue) -> str:
    args = q.declare_arguments()
    if args.get("x-queue-type") == str(q.type):
        del args["x-queue-type"]  # shown first, as the type
    shown = ", ".join(f"{k}={v}" for k, v in sorted(args.items()))
    flags = [f for f, on in (("durable", q.durable), ("exclusive", q.exclusive), ("auto-delete", q.auto_delete)) if on]
    return f"({', '.join([str(q.type), *flags, *([shown] if shown else [])])})"


def _exchange_key(ex: Exchange) -> tuple[Any, ...]:
    return (ex.type, ex.durable, ex.auto_delete, ex.internal, tuple(sorted(ex.arguments.items())))


def _describe_exchange(ex: Exchange) -> str:
    flags = [f for f, on in (("durable", ex.durable), ("auto-delete", ex.auto_delete), ("internal", ex.internal)) if on]
    return f"({', '.join([str(ex.type), *flags])})"
