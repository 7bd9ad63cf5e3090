"""A started service: :class:`RunningService` — its startup and shutdown, its readiness, and when it has failed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..connection import Broker
from ..executors import RunningCall, ThreadRunner
from ..patterns.pubsub import Subscriber
from ..patterns.rpc import RpcServer
from ..patterns.work_queue import CONSUMER_TIMEOUT_ARG, PER_QUEUE_CONSUMER_TIMEOUT, Worker, WorkQueue
from ..settings import BrokerSettings
from ..topology import Binding, Exchange, Queue
from .handlers import ServiceContext
from .plan import Plan, build_plan

if TYPE_CHECKING:
    from .decorators import Service

log = logging.getLogger("amqpkit.service")


class RunningService:
    """A started service: its Broker, its pattern objects, its resources, and whether it is ready.

    Ready means: started, connected, and every handler's consumer attached.
    When a consumer cannot be restored (its queue deleted and not ours to
    declare again, or declared again by someone else with other arguments)
    or a declared exchange, queue or binding cannot be restored after a
    reconnect, the service has *failed*: :attr:`error` says why and
    :meth:`wait_failed` returns. A refusal of access at a reconnect (403:
    rights taken away, the vhost deleted and made again), which an operator
    may lift, does not fail it: the service is not ready, the refusal named,
    while the Broker tries again, and ready once the broker allows it.
    ``give_up_after``: seconds without a connection after which the service
    fails too (None: keep trying).
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
        self.plan: Plan | None = None
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
            refused = self.broker.access_refused
            if refused is not None:  # not the network: the broker answers, and refuses the login
                return False, f"not connected to the broker: {refused}"
            return False, "not connected to the broker (reconnecting)"
        detached = self.broker.detached_consumers()
        if detached:
            # a refusal of access the Broker waits out (see Consumer.error) is said, with the broker's words
            refusals = {str(c.error) for c in self.broker.consumers if c.error is not None and not c.cancelled}
            why = f" ({'; '.join(sorted(refusals))})" if refusals else ""
            return False, f"consumers not attached: {', '.join(sorted(detached))}{why}"
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
        plan = build_plan(service, self.broker, self)  # checks first: nothing is touched if a declaration is wrong
        self.plan = plan
        try:
            if self._own_broker:
                await self.broker.connect()
            self._unsubscribe.append(self.broker.on_topology_error(self._topology_failed))
            self._unsubscribe.append(self.broker.on_disconnect(self._disconnected))
            self._unsubscribe.append(self.broker.on_reconnect(self._reconnected))
            plan.failure_callbacks.append(lambda who, exc: self.fail(f"{who} stopped: {exc}"))
            await service.lifespan.open(self._stack, self.context, self.resources)
            await service.lifespan.started(self.context)
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
            await self.service.lifespan.stopped(self.context)
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

    def _calls_left(self) -> list[RunningCall]:
        """The plain ``def`` handler calls still running in their threads (after a stop: those its grace left)."""
        plan = self.plan
        if plan is None:
            return []
        runners = [w.runner for _, _, w in plan.workers]
        runners += [sub._handler.runner for _, sub in plan.subscribers if sub._handler is not None]
        runners += [info.runner for server, _ in plan.servers.values() for info, _ in server._methods.values()]
        return [call for runner in runners if isinstance(runner, ThreadRunner) for call in runner.running]

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
                refused = self.broker.access_refused
                if refused is not None:  # not the network: the broker answers, and refuses the login
                    self.fail(f"no connection to the broker for {limit:g} s (--give-up-after): {refused}")
                else:
                    self.fail(f"the broker was unreachable for {limit:g} s (--give-up-after)")

    async def _reconnected(self) -> None:
        self._notify()


def _timeout_note(work: WorkQueue[Any], broker: Broker) -> str:
    """How a work queue's own consumer_timeout stands, for the line a started service logs ('' if none asked)."""
    if work.consumer_timeout is None:
        return ""
    version = broker.server_version
    if CONSUMER_TIMEOUT_ARG in work.queue.arguments or not version or version >= PER_QUEUE_CONSUMER_TIMEOUT:
        return f" (consumer_timeout {work.consumer_timeout:g} s)"
    shown = ".".join(map(str, version))
    return f" (consumer_timeout {work.consumer_timeout:g} s not applied: RabbitMQ {shown} has only the node's)"


def _describe_spec(spec: Exchange | Queue | Binding) -> str:
    if isinstance(spec, Exchange):
        return f"exchange {spec.name!r}"
    if isinstance(spec, Queue):
        return f"queue {spec.name or '(server-named)'!r}"
    return f"the binding of {spec.queue.name or '(server-named)'!r} to {spec.exchange.name!r}"
