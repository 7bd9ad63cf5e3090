"""What a service's declarations record: :class:`HandlerSpec`, :class:`PublisherSpec`, and :class:`ServiceError`.

Also the few naming helpers the other modules of :mod:`amqpkit.service` share.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, cast

from ..codec import Codec, codec_for
from ..errors import AmqpkitError
from ..topology import Exchange

T = TypeVar("T")

HandlerKind = Literal["subscriber", "worker", "rpc"]


class ServiceError(AmqpkitError):
    """A service's declarations do not add up (a conflict, a parameter nothing fills, an unresolvable annotation)."""


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


def name_of(fn: Any) -> str:
    """``module:qualname`` of a function (or a callable object), as log lines and errors name it."""
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{qualname}"


def first_line(fn: Any) -> str | None:
    """The first line of ``fn``'s docstring (a declaration's default description), or None."""
    doc = inspect.getdoc(fn)
    return doc.strip().splitlines()[0] if doc else None


def type_name(t: Any) -> str:
    """A type's name as an error message shows it."""
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)


def resolved_hints(fn: Callable[..., Any], what: str) -> dict[str, Any]:
    """``fn``'s resolved annotations; ServiceError naming ``what`` if one does not resolve."""
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(type(fn), "__call__", fn)  # noqa: B004
    try:
        return typing.get_type_hints(target)
    except Exception as exc:  # NameError for a name that is not defined, and whatever else an annotation raises
        raise ServiceError(f"{what}: an annotation cannot be resolved: {type(exc).__name__}: {exc}") from None
