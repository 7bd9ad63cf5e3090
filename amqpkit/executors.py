"""Where a handler runs when it is not an ``async def`` on the event loop: threads, or processes.

- :class:`ThreadRunner`: a bounded pool of threads for plain ``def``
  handlers (blocking I/O, libraries without asyncio). Its size is the
  handler's concurrency (``Worker(concurrency=)``, ``Subscriber(prefetch=)``,
  ``RpcServer(concurrency=)``), so every message in flight has a thread and
  the event loop, with the connection's heartbeats, keeps running.
- :class:`ProcessRunner`: ``processes`` worker processes for CPU-bound work
  (``executor="process"``). The decoded value goes in and the result comes
  back through the standard library's process pool (which pickles them
  between its own processes; what goes over the wire stays JSON). Each
  process is a pool of its own, so a process that dies (``os._exit``,
  SIGKILL, the OOM killer) fails only the task it was running, with
  :class:`~amqpkit.HandlerCrashed`, and a fresh process takes its place.
  Processes are started with ``spawn``: the handler must be importable by
  name (a module-level function), and so must its argument types.

An exception a handler raises in a process comes back as the same type with
the same arguments and attributes (so ``Retry(delay=5)`` and ``Reject`` work
as on the loop); its traceback from the child is chained as the cause. A type
that cannot be found again in the parent becomes a ``RuntimeError`` naming it.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import contextvars
import importlib
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal

from .context import TaskContext, _child_relay
from .errors import HandlerCrashed

__all__ = ["ExecutorKind", "ProcessRunner", "RunningCall", "ThreadRunner", "running_calls"]

log = logging.getLogger("amqpkit.executors")

ExecutorKind = Literal["thread", "process"]


class RunningCall:
    """A call running in a :class:`ThreadRunner`'s thread: which handler, which message, which thread, since when."""

    __slots__ = ("about", "handler", "since", "thread")

    def __init__(self, handler: str, about: str | None) -> None:
        self.handler = handler
        self.about = about
        self.thread = ""
        self.since = time.monotonic()

    def describe(self) -> str:
        """'handler mod.fn (message ID) in thread amqpkit-fn_0, running 12 s'."""
        about = f" ({self.about})" if self.about else ""
        return f"handler {self.handler}{about} in thread {self.thread}, running {time.monotonic() - self.since:.0f} s"


class ThreadRunner:
    """Up to ``max_workers`` threads for plain ``def`` handlers; made on first use.

    :attr:`running` holds the calls under way in its threads, for a stop to say which it leaves behind (a thread
    cannot be stopped: see :meth:`close`).
    """

    def __init__(self, max_workers: int, name: str = "handler") -> None:
        if max_workers < 1:
            raise ValueError("a thread pool needs at least one thread")
        self.max_workers = max_workers
        self.name = name
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._running: set[RunningCall] = set()
        _thread_runners.add(self)

    @property
    def running(self) -> list[RunningCall]:
        """The calls running in this pool's threads now (those a stop's grace did not see end are still here)."""
        with self._lock:
            return list(self._running)

    async def submit(
        self, fn: Callable[..., Any], arg: Any, kwargs: dict[str, Any], *, about: str | None = None
    ) -> concurrent.futures.Future[Any]:
        """Start ``fn(arg, **kwargs)`` in a thread; ``about`` names what it works on (a message id), for logs."""
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.max_workers, thread_name_prefix=f"amqpkit-{self.name}"
                )
            pool = self._pool
        # The handler sees the context variables of the task that received the message.
        ctx = contextvars.copy_context()
        call = RunningCall(getattr(fn, "__qualname__", repr(fn)), about)
        return pool.submit(ctx.run, self._track, call, fn, arg, kwargs)

    def _track(self, call: RunningCall, fn: Callable[..., Any], arg: Any, kwargs: dict[str, Any]) -> Any:
        call.thread = threading.current_thread().name
        call.since = time.monotonic()
        with self._lock:
            self._running.add(call)
        try:
            return _call_sync(fn, arg, kwargs)
        finally:
            with self._lock:
                self._running.discard(call)

    def close(self) -> None:
        """Queued calls are dropped; running ones finish in their threads (a thread cannot be stopped)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


_thread_runners: weakref.WeakSet[ThreadRunner] = weakref.WeakSet()


def running_calls() -> list[RunningCall]:
    """Every plain ``def`` handler call running in a :class:`ThreadRunner`'s thread in this process now."""
    return [call for runner in list(_thread_runners) for call in runner.running]


class _Slot:
    """One process: a pool of its own, so that its death breaks nothing else."""

    __slots__ = ("index", "pool")

    def __init__(self, index: int) -> None:
        self.index = index
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None


class ProcessRunner:
    """``processes`` worker processes, each running one call at a time."""

    def __init__(self, processes: int, name: str = "handler") -> None:
        if processes < 1:
            raise ValueError("a process pool needs at least one process")
        self.processes = processes
        self.name = name
        self.crashes = 0
        self._mp = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(processes)]
        self._free: asyncio.Queue[_Slot] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokens = itertools.count(1)
        self._contexts: dict[int, TaskContext] = {}
        self._progress: Any = None  # a SimpleQueue every process writes its progress reports to
        self._reader: threading.Thread | None = None
        self._closed = False

    async def submit(
        self, fn: Callable[..., Any], arg: Any, kwargs: dict[str, Any], *, about: str | None = None
    ) -> concurrent.futures.Future[Any]:
        """Wait for a free process, then start ``fn(arg, **kwargs)`` in it; the call's future."""
        loop = asyncio.get_running_loop()
        if self._closed or self._free is None or self._loop is not loop:
            self._closed = False  # started again after close(): fresh processes
            self._loop = loop
            self._free = asyncio.Queue()
            for slot in self._slots:
                self._free.put_nowait(slot)
        slot = await self._free.get()
        try:
            pool = self._pool_of(slot)
            token = None
            for value in kwargs.values():
                if isinstance(value, TaskContext):
                    token = value.token = next(self._tokens)
                    self._contexts[token] = value
            future = pool.submit(_call_in_child, fn, arg, kwargs, asyncio.iscoroutinefunction(fn))
        except BaseException:
            if token is not None:
                self._contexts.pop(token, None)
            self._free.put_nowait(slot)
            raise
        future.add_done_callback(lambda f: self._from_any_thread(self._release, slot, pool, f, token))
        return future

    def _pool_of(self, slot: _Slot) -> concurrent.futures.ProcessPoolExecutor:
        if slot.pool is None:
            if self._progress is None:
                self._progress = self._mp.SimpleQueue()
                self._reader = threading.Thread(
                    target=self._read_progress, args=(self._progress,), name=f"amqpkit-{self.name}-progress",
                    daemon=True,
                )  # fmt: skip
                self._reader.start()
            slot.pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=self._mp, initializer=_child_init, initargs=(self._progress,)
            )
        return slot.pool

    def _from_any_thread(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    def _release(
        self, slot: _Slot, pool: concurrent.futures.ProcessPoolExecutor, future: concurrent.futures.Future[Any],
        token: int | None,
    ) -> None:  # fmt: skip
        failed = None if future.cancelled() else future.exception()
        broken = isinstance(failed, BrokenProcessPool)
        if token is not None and (broken or future.cancelled()):
            self._contexts.pop(token, None)
        elif token is not None and failed is not None and not isinstance(failed, _Carried):
            # Its arguments could not be pickled (it never ran: no end-of-call report will come), or its result
            # could not be (it ran, and its reports may still be on the way): an end-of-call report of our own,
            # behind whatever the process put on the queue before it answered, drops the context either way.
            with contextlib.suppress(Exception):
                if self._progress is not None:
                    self._progress.put((token, None, None))
        if slot.pool is not pool or self._free is None:
            return  # closed since: the slot is not handed out from this pool any more
        if broken:
            self.crashes += 1
            # For crash(): the dead process (its exit status may not be collected yet).
            future._amqpkit_processes = list((getattr(pool, "_processes", None) or {}).values())  # type: ignore[attr-defined]
            slot.pool = None  # a fresh process next time
            pool.shutdown(wait=False, cancel_futures=True)
        self._free.put_nowait(slot)

    def crash(self, future: concurrent.futures.Future[Any], handler: str) -> HandlerCrashed:
        """The error for a call whose process died under it (with its exit status when known).

        It may wait up to 2 s for the status (run it off the event loop): the pool's own thread may be
        reaping the same process, and until it has, the status reads as unknown.
        """
        code: int | None = None
        give_up = time.monotonic() + 2.0
        for process in getattr(future, "_amqpkit_processes", ()):
            status: int | None = None
            while status is None and time.monotonic() < give_up:
                with contextlib.suppress(Exception):
                    process.join(timeout=0.1)  # it is dead (or told to end): this only collects its status
                status = process.exitcode
            if status:
                code = status
                break
        how = f"exit status {code}" if code is not None and code >= 0 else ""
        if code is not None and code < 0:
            how = f"killed by signal {-code}"
        return HandlerCrashed(
            f"the process running handler {handler} died before it returned ({how or 'killed, or os._exit'}); "
            "a fresh process takes its place",
            exitcode=code,
        )

    def _read_progress(self, queue: Any) -> None:
        while True:
            try:
                item = queue.get()
            except (EOFError, OSError, ValueError):
                return
            if item is None:
                return
            token, fraction, note = item
            self._from_any_thread(self._progress_arrived, token, fraction, note)

    def _progress_arrived(self, token: int, fraction: float | None, note: str | None) -> None:
        if fraction is None:  # the call ended: every report it made came before this
            self._contexts.pop(token, None)
            return
        ctx = self._contexts.get(token)
        if ctx is not None:
            with contextlib.suppress(ValueError):
                ctx.progress_nowait(fraction, note)

    def close(self) -> None:
        """Stop every process now (a running call is killed: its task was given back to the queue)."""
        self._closed = True
        for slot in self._slots:
            pool, slot.pool = slot.pool, None
            if pool is not None:
                _terminate(pool)
        if self._progress is not None:
            with contextlib.suppress(Exception):
                self._progress.put(None)
            if self._reader is not None:
                self._reader.join(timeout=5)
            with contextlib.suppress(Exception):
                self._progress.close()
            self._progress = None
            self._reader = None
        self._contexts.clear()
        self._free = None


def _terminate(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:  # SIGKILL: a pool process ignores SIGTERM (see _child_init)
        with contextlib.suppress(Exception):
            if process.is_alive():
                process.kill()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=2)


# ---------------------------------------------------------------- in the thread, in the child


def _call_sync(fn: Callable[..., Any], arg: Any, kwargs: dict[str, Any]) -> Any:
    result = fn(arg, **kwargs)
    if asyncio.iscoroutine(result):
        result.close()
        raise TypeError(f"handler {getattr(fn, '__qualname__', fn)!r} returned a coroutine: make it 'async def'")
    return result


def _child_init(progress: Any) -> None:
    # Ctrl-C signals the terminal's whole foreground group, and systemd's default KillMode sends SIGTERM
    # to every process of the unit: a pool process left to die of them would kill the task the worker
    # is letting finish within its grace. The worker decides when its pool stops (ProcessRunner.close).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def relay(token: int, fraction: float | None, note: str | None) -> None:
        progress.put((token, fraction, note))

    _child_relay[:] = [relay]


def _call_in_child(fn: Callable[..., Any], arg: Any, kwargs: dict[str, Any], is_async: bool) -> Any:
    try:
        if is_async:
            return asyncio.run(fn(arg, **kwargs))
        return _call_sync(fn, arg, kwargs)
    except BaseException as exc:
        raise _Carried.of(exc) from None
    finally:
        for value in kwargs.values():
            if isinstance(value, TaskContext) and value.token is not None and _child_relay:
                _child_relay[0](value.token, None, None)  # the end of this call's reports


class _Carried(Exception):
    """An exception on its way back from a pool process, as plain data (type by name, args, attributes)."""

    def __init__(self, module: str, qualname: str, args: tuple[Any, ...], state: dict[str, Any], tb: str) -> None:
        super().__init__(module, qualname, args, state, tb)
        self.module, self.qualname, self.exc_args, self.state, self.tb = module, qualname, args, state, tb

    @classmethod
    def of(cls, exc: BaseException) -> _Carried:
        kind = type(exc)
        tb = "".join(traceback.format_exception(kind, exc, exc.__traceback__))
        state = {k: _plain(v) for k, v in getattr(exc, "__dict__", {}).items() if not k.startswith("__")}
        return cls(kind.__module__, kind.__qualname__, tuple(_plain(a) for a in exc.args), state, tb)

    def restore(self) -> BaseException:
        kind = _find_exception(self.module, self.qualname)
        exc: BaseException
        if kind is None:
            text = ", ".join(str(a) for a in self.exc_args)
            exc = RuntimeError(f"{self.module}.{self.qualname}: {text}")
        else:
            try:
                exc = kind.__new__(kind)
                exc.args = self.exc_args
                if hasattr(exc, "__dict__"):
                    exc.__dict__.update(self.state)
            except Exception:
                exc = RuntimeError(f"{self.module}.{self.qualname}: {', '.join(str(a) for a in self.exc_args)}")
        exc.__cause__ = RemoteTraceback(self.tb)
        return exc


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a pool process, as the child printed it."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0] if self.args else ""}"""'


def _find_exception(module: str, qualname: str) -> type[BaseException] | None:
    try:
        target: Any = builtins if module == "builtins" else importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        return None
    return target if isinstance(target, type) and issubclass(target, BaseException) else None


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as plain data (str, numbers, lists, dicts of those), else its repr."""
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if depth < 4 and isinstance(value, list | tuple):
        return (
            type(value)(_plain(v, depth + 1) for v in value)
            if isinstance(value, tuple)
            else [_plain(v, depth + 1) for v in value]
        )
    if depth < 4 and isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    return repr(value)


def default_processes(concurrency: int) -> int:
    """As many processes as cores, at most one per message in flight."""
    return max(1, min(concurrency, os.cpu_count() or 1))
