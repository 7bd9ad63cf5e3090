"""``load_service("package.module:attr")``: the :class:`Service` a command line names (``amqpkit run``)."""

from __future__ import annotations

import sys
from typing import Any

from .decorators import Service
from .specs import ServiceError


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
