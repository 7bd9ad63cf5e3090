"""Typed handlers: what a handler's signature asks for, and where it runs.

- ``async def``: on the event loop (the default; fastest for I/O-bound work).
- plain ``def``: in a bounded thread pool, one thread per message in flight
  (:class:`~amqpkit.executors.ThreadRunner`), so blocking code never stops
  the loop and its heartbeats.
- ``executor="process"``: in a pool of processes, for CPU-bound work
  (:class:`~amqpkit.executors.ProcessRunner`).

The first parameter takes the message: ``X`` (the decoded value; the codec
comes from the annotation) or ``Delivery[X]`` (the whole delivery). A
parameter annotated :class:`~amqpkit.TaskContext` gets the task's context
(work queues only).

A delivery whose channel closes while its handler runs (the connection
dropped, or the broker's ``consumer_timeout``) is given back to the queue,
and the task awaiting the handler is cancelled. An ``async def`` stops there;
a thread or a process cannot be stopped and runs on. Its future is kept by
message id, and when the broker delivers that same message again (flagged
redelivered) the handler is not started a second time: the new delivery
waits for the run already going and takes its outcome.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import typing
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .codec import Codec, codec_for
from .context import TaskContext
from .executors import ExecutorKind, ProcessRunner, ThreadRunner, _Carried, default_processes
from .message import Delivery
from .watchdog import register_handler

__all__ = ["HandlerInfo", "inspect_handler"]

log = logging.getLogger("amqpkit.handlers")

Handler = Callable[..., Any]
ContextFactory = Callable[[Delivery[Any]], TaskContext]

KEEP_ORPHANS = 1000  # runs kept, by message id, whose delivery was lost while they ran


class HandlerInfo:
    """A handler, the codec for its argument, what else it asks for, and where it runs."""

    def __init__(
        self,
        fn: Handler,
        codec: Codec[Any],
        wants_delivery: bool,
        returns: Any,
        *,
        is_async: bool = True,
        runner: ThreadRunner | ProcessRunner | None = None,
        context_param: str | None = None,
        context: ContextFactory | None = None,
        name: str | None = None,
    ) -> None:
        self.fn = fn
        self.codec = codec
        self.wants_delivery = wants_delivery
        self.returns = returns
        self.is_async = is_async
        self.runner = runner
        self.context_param = context_param
        self.context = context
        self.name = name or register_handler(fn)
        self._orphans: OrderedDict[str, concurrent.futures.Future[Any]] = OrderedDict()
        self.adopted = 0

    @property
    def runs_on(self) -> str:
        """'loop', 'thread' or 'process'."""
        if self.runner is None:
            return "loop"
        return "process" if isinstance(self.runner, ProcessRunner) else "thread"

    def __repr__(self) -> str:
        return f"<HandlerInfo {self.name} on {self.runs_on}>"

    def _arguments(self, delivery: Delivery[Any]) -> tuple[Any, dict[str, Any]]:
        arg = delivery if self.wants_delivery else delivery.value
        if self.context_param is None:
            return arg, {}
        assert self.context is not None
        return arg, {self.context_param: self.context(delivery)}

    async def __call__(self, delivery: Delivery[Any]) -> Any:
        if self.runner is None:
            arg, kwargs = self._arguments(delivery)
            return await self.fn(arg, **kwargs)
        key = delivery.message_id
        future = self.adopt(key) if key and delivery.redelivered else None
        if future is None:
            arg, kwargs = self._arguments(delivery)
            future = await self.runner.submit(self.fn, arg, kwargs, about=f"message {key}" if key else None)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError as cancelled:
            # aiormq cancels with the reason when the channel or connection closed under the delivery;
            # a stop out of grace cancels without one (the pool is closed right after). A run that ended in
            # the same loop turn is kept too: its outcome is there, and the redelivery takes it.
            if key and cancelled.args:
                self._keep_orphan(key, future)
            raise
        except BrokenProcessPool:
            assert isinstance(self.runner, ProcessRunner)
            raise await asyncio.to_thread(self.runner.crash, future, self.name) from None
        except _Carried as carried:
            raise carried.restore()  # noqa: B904 - the child's traceback is chained as its cause

    # ------------------------------------------------------------------ runs that outlived their delivery

    def _keep_orphan(self, key: str, future: concurrent.futures.Future[Any]) -> None:
        self._orphans[key] = future
        self._orphans.move_to_end(key)
        while len(self._orphans) > KEEP_ORPHANS:
            self._orphans.popitem(last=False)
        log.info(
            "handler %s for message %s %s in its %s as its delivery was lost; "
            "the broker's next delivery of it will take this run's outcome instead of starting another",
            self.name, key, "ended" if future.done() else "runs on", self.runs_on,
        )  # fmt: skip

    def orphan(self, key: str | None) -> concurrent.futures.Future[Any] | None:
        """The run still going (or finished) for message ``key`` whose delivery was lost, if any."""
        return self._orphans.get(key) if key else None

    def adopt(self, key: str) -> concurrent.futures.Future[Any] | None:
        future = self._orphans.pop(key, None)
        if future is not None:
            self.adopted += 1
            log.info("message %s delivered again: it takes the outcome of the run already going", key)
        return future

    def close(self) -> None:
        """Stop the pool (queued calls dropped; processes stopped; threads finish what they run)."""
        self._orphans.clear()
        if self.runner is not None:
            self.runner.close()


def checked_concurrency(concurrency: int, owner: str) -> int:
    """``concurrency`` for a pattern that takes that many messages at a time (its prefetch): 1 to 65,535. A 0
    would be the prefetch's "no limit", the whole backlog taken into memory and run at once."""
    if not 1 <= concurrency <= 65535:
        raise ValueError(f"{owner} concurrency must be 1 to 65535 (messages in flight at a time); got {concurrency}")
    return concurrency


def inspect_handler(
    fn: Handler,
    codec: Codec[Any] | None = None,
    *,
    concurrency: int = 16,
    executor: ExecutorKind | None = None,
    processes: int | None = None,
    context: ContextFactory | None = None,
) -> HandlerInfo:
    """Read ``fn``'s signature and choose where it runs.

    First parameter: ``Delivery[X]`` -> wants the delivery, codec for X;
    ``X`` -> codec for X (an explicit ``codec`` wins over the annotation).
    A parameter annotated :class:`TaskContext` gets one from ``context``.
    ``concurrency`` sizes the thread pool of a plain ``def``;
    ``executor="process"`` runs it (``def`` or ``async def``) in
    ``processes`` processes (default: the cores, at most ``concurrency``).
    """
    if not callable(fn):
        raise TypeError(f"handler {fn!r} is not callable")
    if executor not in (None, "thread", "process"):
        raise ValueError(f"executor must be 'thread' or 'process', not {executor!r}")
    if processes is not None and executor != "process":
        raise ValueError("processes= goes with executor='process'")
    name = register_handler(fn)
    call = type(fn).__call__ if not inspect.isfunction(fn) and not inspect.ismethod(fn) else fn
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        raise TypeError(f"handler {name} must take the message as its first argument")
    hints = _hints(fn, call)
    annotation = hints.get(params[0].name, Any)
    if annotation is TaskContext:
        raise TypeError(f"handler {name}: the message comes first, the TaskContext after it")
    context_param = next(
        (p.name for p in list(signature.parameters.values())[1:] if hints.get(p.name) is TaskContext), None
    )
    if context_param is not None and context is None:
        raise TypeError(f"handler {name} asks for a TaskContext: only work-queue handlers (Worker) get one")
    returns = hints.get("return", Any)
    wants_delivery = annotation is Delivery or typing.get_origin(annotation) is Delivery
    if wants_delivery:
        args = typing.get_args(annotation)
        annotation = args[0] if args else bytes
    runner: ThreadRunner | ProcessRunner | None = None
    if executor == "process":
        if wants_delivery:
            raise TypeError(f"handler {name} runs in a process: it takes the message's value, not the Delivery")
        if "<locals>" in getattr(fn, "__qualname__", "") or getattr(fn, "__name__", "") == "<lambda>":
            raise TypeError(
                f"handler {name} runs in a process, which imports it by name: make it a module-level function"
            )
        runner = ProcessRunner(processes or default_processes(concurrency), name=_short(name))
    elif is_async:
        if executor == "thread":
            raise TypeError(f"handler {name} is async: it runs on the event loop (executor='thread' is for def)")
    else:
        runner = ThreadRunner(concurrency, name=_short(name))
    return HandlerInfo(
        fn, codec or codec_for(annotation), wants_delivery, returns, is_async=is_async, runner=runner,
        context_param=context_param, context=context, name=name,
    )  # fmt: skip


def _hints(fn: Any, call: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn if fn is call else call)
    except Exception:  # unresolvable annotations: treated as unannotated
        return {}


def _short(name: str) -> str:
    return name.rsplit(":", 1)[-1].replace("<locals>.", "")[:40]
