"""A service's resources and lifespan hooks: what ``@svc.resource``, ``on_startup`` and ``on_shutdown`` declare.

Resources are made at startup in the order declared and closed in reverse
(an exit stack); a handler asks for one by the type it provides, which its
return annotation names. Startup hooks run after the resources are made,
shutdown hooks once every handler has stopped, before the resources close.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import typing
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..context import TaskContext
from .handlers import ServiceContext
from .specs import ServiceError, name_of, resolved_hints, type_name

log = logging.getLogger("amqpkit.service")

# What typing.get_origin() gives for AsyncIterator[X], AsyncGenerator[X, None], Iterator[X], Generator[X, ...].
_ITERATORS = (AsyncIterator, AsyncGenerator, Iterator, Generator)


@dataclass(eq=False)
class Resource:
    """One ``@svc.resource``: the function that makes it, the type it provides (once resolved), its name."""

    fn: Callable[..., Any]
    provides: Any
    name: str


@dataclass(eq=False)
class Lifespan:
    """A service's resources and its startup and shutdown hooks, in the order declared."""

    resources: list[Resource] = field(default_factory=list)
    startup: list[Callable[..., Any]] = field(default_factory=list)
    shutdown: list[Callable[..., Any]] = field(default_factory=list)

    def add_resource(self, fn: Callable[..., Any]) -> None:
        self.resources.append(Resource(fn, None, name_of(fn)))

    def resolve(self) -> dict[Any, str]:
        """Each resource type and the name of the function that provides it; ServiceError if one is unclear."""
        seen: dict[Any, str] = {}
        for res in self.resources:
            hints = resolved_hints(res.fn, f"resource {res.name}")
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
                raise ServiceError(f"resources {seen[provides]} and {res.name} both provide {type_name(provides)}")
            seen[provides] = res.name
            res.provides = provides
        return seen

    async def open(self, stack: contextlib.AsyncExitStack, ctx: ServiceContext, into: dict[Any, Any]) -> None:
        """Make each resource in turn (its closing goes on ``stack``), into ``into`` by type as soon as it is made."""
        for res in self.resources:
            into[res.provides] = await _enter(res.fn, stack, ctx)

    async def started(self, ctx: ServiceContext) -> None:
        """Run the startup hooks in order; the first that raises stops the start."""
        for hook in self.startup:
            await _call_hook(hook, ctx)

    async def stopped(self, ctx: ServiceContext) -> None:
        """Run the shutdown hooks in order; one that raises is logged and the others still run."""
        for hook in self.shutdown:
            try:
                await _call_hook(hook, ctx)
            except Exception:
                log.exception("shutdown hook %s failed", name_of(hook))


async def _enter(fn: Callable[..., Any], stack: contextlib.AsyncExitStack, ctx: ServiceContext) -> Any:
    args = (ctx,) if _takes_argument(fn) else ()
    if inspect.isasyncgenfunction(fn):
        return await stack.enter_async_context(contextlib.asynccontextmanager(fn)(*args))
    if inspect.isgeneratorfunction(fn):
        return stack.enter_context(contextlib.contextmanager(fn)(*args))
    value = fn(*args)
    if inspect.isawaitable(value):
        value = await value
    return value


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
