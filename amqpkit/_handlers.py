"""Typed handlers: what a handler's signature asks for, and how to call it."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .codec import Codec, codec_for
from .message import Delivery

__all__ = ["HandlerInfo", "inspect_handler"]

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class HandlerInfo:
    """A handler, the codec for its argument, and whether it wants the whole Delivery."""

    fn: Handler
    codec: Codec[Any]
    wants_delivery: bool
    returns: Any

    async def __call__(self, delivery: Delivery[Any]) -> Any:
        return await self.fn(delivery if self.wants_delivery else delivery.value)


def inspect_handler(fn: Handler, codec: Codec[Any] | None = None) -> HandlerInfo:
    """Read ``fn``'s first parameter: ``Delivery[X]`` -> wants the delivery, codec for X; ``X`` -> codec for X.

    An explicit ``codec`` wins over the annotation.
    """
    call = type(fn).__call__ if not inspect.isfunction(fn) and not inspect.ismethod(fn) else fn
    if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(call):
        raise TypeError(f"handler {getattr(fn, '__qualname__', fn)!r} must be an async function")
    params = [
        p for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not params:
        raise TypeError(f"handler {getattr(fn, '__qualname__', fn)!r} must take the message as its first argument")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    annotation = hints.get(params[0].name, Any)
    returns = hints.get("return", Any)
    wants_delivery = annotation is Delivery or typing.get_origin(annotation) is Delivery
    if wants_delivery:
        args = typing.get_args(annotation)
        annotation = args[0] if args else bytes
    return HandlerInfo(fn, codec or codec_for(annotation), wants_delivery, returns)
