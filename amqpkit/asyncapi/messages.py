"""The messages of an AsyncAPI document: each one once in ``components.messages``, its payload's JSON Schema.

A message is written with its payload's type; :meth:`Messages.fill_payloads`
then makes every schema in one pass, so that a model shared by two messages
gets one name in ``components.schemas``. An RPC method's error reply is
amqpkit's error document (:data:`ERROR_SCHEMA`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from ..codec import Codec
from ..patterns.rpc import ERROR_CONTENT_TYPE

AMQP_BINDING_VERSION = "0.3.0"
SCHEMA_REF = "#/components/schemas/{model}"
ERROR_MESSAGE = "amqpkit.rpc.error"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "What amqpkit's RPC server replies when the method raised or the request was refused",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "type": {"type": "string", "description": "the exception's type, e.g. ValueError"},
                "message": {"type": "string"},
                "details": {"type": "object"},
            },
            "required": ["type", "message"],
        }
    },
    "required": ["error"],
}


class Messages:
    """``components.messages`` and ``components.schemas`` of one document."""

    def __init__(self) -> None:
        self.messages: dict[str, dict[str, Any]] = {}
        self.schemas: dict[str, Any] = {}
        self._payload_types: list[tuple[str, str, Any]] = []  # (message id, mode, type)

    def add(self, message: dict[str, Any]) -> str:
        """Put ``message`` in components, once (an equal one already there is reused); its key."""
        for existing_key, existing in self.messages.items():
            if _same_message(existing, message):
                return existing_key
        key = component_id(message["name"], self.messages)
        self.messages[key] = message
        payload = message["payload"]
        if isinstance(payload, dict) and "type_" in payload:
            self._payload_types.append((key, payload["mode"], payload["type_"]))
        return key

    def fill_payloads(self) -> None:
        """Every payload's JSON Schema, generated in one pass so that shared models get one name."""
        inputs = []
        failed: dict[str, str] = {}
        for key, mode, payload_type in self._payload_types:
            try:
                inputs.append((key, mode, TypeAdapter(payload_type).core_schema))
            except Exception as exc:  # a type pydantic has no schema for: documented as "anything"
                failed[key] = f"{type(exc).__name__}: {exc}"
        generator = GenerateJsonSchema(ref_template=SCHEMA_REF)
        mapping, definitions = generator.generate_definitions(inputs)  # type: ignore[arg-type]
        for (key, _mode), schema in mapping.items():
            self.messages[key]["payload"] = schema
        for key, why in failed.items():
            self.messages[key]["payload"] = {"description": f"no JSON Schema for this type ({why[:200]})"}
        self.schemas.update({str(name): schema for name, schema in definitions.items()})


def message(
    name: str,
    payload_type: Any,
    codec: Codec[Any],
    mode: str,
    *,
    method: str | None = None,
    rpc: bool = False,
) -> dict[str, Any]:
    """A message of ``payload_type`` (named after it when it is a class, else ``name``)."""
    title = name if method is not None or rpc else _type_title(payload_type, name)
    msg: dict[str, Any] = {
        "name": title,
        "title": _type_title(payload_type, name),
        "contentType": codec.content_type,
        "payload": {"type_": payload_type, "mode": mode},  # replaced by its schema in Messages.fill_payloads
    }
    if method is not None or rpc:
        msg["correlationId"] = {"location": "$message.header#/correlationId"}
    if method is not None:
        msg["bindings"] = {"amqp": {"messageType": method, "bindingVersion": AMQP_BINDING_VERSION}}
    return msg


def error_message() -> dict[str, Any]:
    """What amqpkit's RPC server replies when the method raised or the request was refused."""
    return {
        "name": ERROR_MESSAGE,
        "title": "RPC error",
        "summary": "the method raised, or the request could not be served",
        "contentType": ERROR_CONTENT_TYPE,
        "correlationId": {"location": "$message.header#/correlationId"},
        "payload": ERROR_SCHEMA,
    }


def component_id(wanted: str, taken: dict[str, Any]) -> str:
    """An id for a new entry of ``taken`` (channels, operations, messages): ``wanted`` made safe and unique."""
    return _unique(_safe_id(wanted), taken)


def _safe_id(text: str) -> str:
    """An id AsyncAPI accepts as a component key: letters, digits, '.', '-', '_'."""
    text = text.replace("#", "hash").replace("*", "star")
    return re.sub(r"[^\w.\-]", "_", text) or "_"


def _unique(base: str, taken: dict[str, Any]) -> str:
    if base not in taken:
        return base
    n = 2
    while f"{base}_{n}" in taken:
        n += 1
    return f"{base}_{n}"


def _same_message(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two messages are one: same fields, and the same payload type and mode (or the same schema)."""

    def parts(m: dict[str, Any]) -> tuple[str, Any]:
        payload = m["payload"]
        rest = json.dumps({k: v for k, v in m.items() if k != "payload"}, sort_keys=True, default=repr)
        if isinstance(payload, dict) and "type_" in payload:
            return rest, ("type", payload["type_"], payload["mode"])
        return rest, ("schema", json.dumps(payload, sort_keys=True))

    try:
        return parts(a) == parts(b)
    except TypeError:  # a type that does not compare
        return False


def _type_title(t: Any, fallback: str) -> str:
    name = getattr(t, "__name__", None)
    if isinstance(name, str) and name not in ("Any",) and not name.startswith("<"):
        return name
    return fallback
