"""amqpkit's public surface: no transport type in it, and no change to it by accident.

Every name in ``amqpkit.__all__`` is walked: a function's signature; a
class's constructor, public methods and properties, annotated public
attributes and dataclass fields. Any aiormq or pamqp type found fails the
first test. The second compares the names and signatures with
``tests/public_surface.txt``: a change there is deliberate, made with
``AMQPKIT_UPDATE_SURFACE=1 pytest tests/test_public_surface.py``, and shows in review.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import typing
from pathlib import Path
from typing import Any

import aiormq.abc
import pamqp.commands

import amqpkit

SNAPSHOT = Path(__file__).with_name("public_surface.txt")
TRANSPORT = ("aiormq", "pamqp")
# Names a module imports only for type checking, so that its annotations resolve here.
EXTRA_NAMES = {
    "AbstractChannel": aiormq.abc.AbstractChannel,
    "DeliveredMessage": aiormq.abc.DeliveredMessage,
    "Basic": pamqp.commands.Basic,
}


def exported() -> list[tuple[str, Any]]:
    return [(name, getattr(amqpkit, name)) for name in amqpkit.__all__ if name != "__version__"]


def members(cls: type) -> list[tuple[str, Any]]:
    """A class's public callables and properties (its own and inherited from amqpkit), with __init__."""
    found = []
    for name, value in inspect.getmembers(cls):
        if name.startswith("_") and name != "__init__":
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or not owner.__module__.startswith("amqpkit"):
            continue
        raw = inspect.getattr_static(cls, name)
        if isinstance(raw, property) and raw.fget is not None:
            found.append((name, raw.fget))
        elif isinstance(raw, (staticmethod, classmethod)) or inspect.isfunction(raw):
            found.append((name, value))
    return found


def shared_namespace() -> dict[str, Any]:
    """Every name amqpkit's modules define or import: a type alias's forward references resolve in any of them."""
    namespace: dict[str, Any] = {**vars(typing), **EXTRA_NAMES}
    for module_name, module in list(sys.modules.items()):
        if module_name.split(".")[0] == "amqpkit" and module is not None:
            namespace.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    return namespace


def hints(obj: Any) -> dict[str, Any]:
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    namespace = {**shared_namespace(), **(vars(module) if module else {})}
    target = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
    return typing.get_type_hints(target, globalns=namespace, localns=namespace)


def types_in(annotation: Any) -> list[Any]:
    found = [annotation]
    for arg in typing.get_args(annotation):
        if isinstance(arg, list):
            for a in arg:
                found += types_in(a)
        else:
            found += types_in(arg)
    return found


def transport_types(where: str, annotations: dict[str, Any]) -> list[str]:
    bad = []
    for name, annotation in annotations.items():
        for t in types_in(annotation):
            module = getattr(t, "__module__", "") or ""
            if module.split(".")[0] in TRANSPORT:
                bad.append(f"{where}: {name}: {t!r}")
    return bad


def test_no_aiormq_or_pamqp_type_in_the_public_surface() -> None:
    bad: list[str] = []
    for name, obj in exported():
        if inspect.isclass(obj):
            for member, fn in members(obj):
                bad += transport_types(f"{name}.{member}", hints(fn))
            if dataclasses.is_dataclass(obj):
                fields = {f.name: f.type for f in dataclasses.fields(obj) if not f.name.startswith("_")}
                bad += transport_types(name, {k: v for k, v in hints(obj).items() if k in fields})
            else:
                own = {k: v for k, v in hints(obj).items() if not k.startswith("_")} if obj.__module__ else {}
                bad += transport_types(name, own)
        elif callable(obj):
            bad += transport_types(name, hints(obj))
    assert bad == [], "\n".join(bad)


def surface() -> str:
    lines = []
    for name, obj in exported():
        if inspect.isclass(obj):
            lines.append(f"class {name}")
            for member, fn in members(obj):
                try:
                    shown = str(inspect.signature(fn))
                except (TypeError, ValueError):
                    shown = "(?)"
                lines.append(f"    {member}{shown}")
            if dataclasses.is_dataclass(obj):
                for f in dataclasses.fields(obj):
                    if not f.name.startswith("_"):
                        lines.append(f"    field {f.name}: {f.type}")
        elif callable(obj):
            lines.append(f"def {name}{inspect.signature(obj)}")
        else:
            lines.append(f"{name} = {obj!r}")
    return "\n".join(lines) + "\n"


def test_the_public_surface_is_as_recorded() -> None:
    now = surface()
    if os.environ.get("AMQPKIT_UPDATE_SURFACE") == "1":
        SNAPSHOT.write_text(now)
    recorded = SNAPSHOT.read_text()
    assert now == recorded, "the public surface changed: if on purpose, AMQPKIT_UPDATE_SURFACE=1 and review the diff"
