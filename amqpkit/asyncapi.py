"""An AsyncAPI 3.0.0 document of a :class:`~amqpkit.service.Service`, from its declarations.

``amqpkit asyncapi MODULE:ATTR [-o FILE] [--yaml]`` writes it. Nothing is
sent to a broker: the document comes from the same pattern objects the
service runs on, built but not started.

How the service maps onto AsyncAPI:

- **servers**: one per URL of the settings (``amqp``/``amqps``, host and
  port, the vhost as ``pathname``); the user and password are never written,
  only that the server asks for them (a ``userPassword`` security scheme).
- **channels**: an exchange with a routing key (``is: routingKey``) for
  publish/subscribe, one per binding of a subscriber and per declared
  publisher (shared when both meet); a queue (``is: queue``) for a work
  queue and an RPC request queue; and, for each RPC queue, the reply channel
  (the caller's ``reply_to``, so its address is unknown until run time).
- **operations**: ``receive`` for each subscriber binding, worker and RPC
  method; ``send`` for each declared publisher. An RPC method's operation
  carries a ``reply`` object: where the reply goes (``replyTo``), its
  channel and its messages (the result, or amqpkit's error document).
- **messages**: the payload's JSON Schema from the handler's annotation
  (pydantic models and plain types; models go to ``components.schemas``),
  the content type its codec writes, the correlation id for RPC, and AMQP
  message bindings (``messageType``: the RPC method name).
- AMQP **channel, operation and message bindings** (version 0.3.0); what
  AsyncAPI has no field for (the subscription queue, a work queue's
  dead-letter queue and retry policy) goes into ``x-amqpkit-*`` extensions.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from .codec import Codec
from .connection import Broker
from .patterns.rpc import ERROR_CONTENT_TYPE
from .service import HandlerSpec, PublisherSpec, Service
from .service.plan import build_plan
from .settings import BrokerSettings
from .topology import Binding, Exchange, ExchangeType, Queue

__all__ = ["ASYNCAPI_VERSION", "asyncapi_document", "to_json", "to_yaml"]

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"
SCHEMA_REF = "#/components/schemas/{model}"
SECURITY_SCHEME = "user-password"
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


def asyncapi_document(service: Service, settings: BrokerSettings | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of ``service`` (a dict ready for JSON); checks the service first."""
    settings = settings or service.settings or BrokerSettings()
    plan = build_plan(service, Broker(settings), None)
    return _Builder(service, settings).build(plan)


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------- building


class _Builder:
    def __init__(self, service: Service, settings: BrokerSettings) -> None:
        self.service = service
        self.settings = settings
        self.vhost = _vhost(settings.urls[0])
        self.channels: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.schemas: dict[str, Any] = {}
        self._payload_types: list[tuple[str, str, Any]] = []  # (message id, mode, type)
        self._channel_keys: dict[tuple[Any, ...], str] = {}

    def build(self, plan: Any) -> dict[str, Any]:
        for spec, sub in plan.subscribers:
            self._subscriber(spec, sub.exchange, sub.queue, sub.bindings)
        for spec, work, worker in plan.workers:
            self._worker(spec, work.queue, work.dlq, work.retry, worker.concurrency)
        for name, (server, specs) in plan.servers.items():
            self._rpc(name, server.queue, specs)
        for pub in self.service.publishers:
            self._publisher(pub)
        self._fill_payloads()
        doc: dict[str, Any] = {
            "asyncapi": ASYNCAPI_VERSION,
            "info": self._info(),
            "servers": self._servers(),
            "defaultContentType": "application/json",
            "channels": self.channels,
            "operations": self.operations,
            "components": {
                "messages": self.messages,
                "schemas": self.schemas,
                "securitySchemes": {
                    SECURITY_SCHEME: {"type": "userPassword", "description": "the user and password of the AMQP URL"}
                },
            },
        }
        return doc

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"title": self.service.name, "version": self.service.version}
        if self.service.description:
            info["description"] = self.service.description
        return info

    def _servers(self) -> dict[str, Any]:
        servers: dict[str, Any] = {}
        urls = self.settings.urls
        for i, url in enumerate(urls, 1):
            parts = urlsplit(url)
            scheme = parts.scheme or "amqp"
            port = parts.port or (5671 if scheme == "amqps" else 5672)
            server: dict[str, Any] = {
                "host": f"{parts.hostname or 'localhost'}:{port}",
                "protocol": scheme,
                "protocolVersion": "0.9.1",
                "pathname": parts.path or "/",
                "description": f"RabbitMQ, vhost {_vhost(url)!r}",
                "security": [{"$ref": f"#/components/securitySchemes/{SECURITY_SCHEME}"}],
            }
            servers["rabbitmq" if len(urls) == 1 else f"rabbitmq-{i}"] = server
        return servers

    # ------------------------------------------------------------------ the handlers

    def _subscriber(self, spec: HandlerSpec, exchange: Exchange, queue: Queue, bindings: tuple[Binding, ...]) -> None:
        message = self._message(spec.short_name, spec.message_type, spec.codec, "validation")
        queue_ext = self._queue_extension(queue)
        routes: list[tuple[str | None, Binding | None]] = [(b.routing_key, b) for b in bindings]
        if not routes:  # the default exchange: routed by the queue's name
            routes = [(queue.name or None, None)]
        for i, (key, binding) in enumerate(routes):
            channel = self._exchange_channel(exchange, key, binding)
            ref = self._add_message(channel, message)
            op: dict[str, Any] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{channel}"},
                "messages": [{"$ref": ref}],
                "bindings": {"amqp": {"ack": not spec.options["auto_ack"], "bindingVersion": AMQP_BINDING_VERSION}},
                "x-amqpkit-handler": spec.name,
                "x-amqpkit-queue": queue_ext,
            }
            if spec.description:
                op["summary"] = spec.description
            self.operations[self._operation_id(spec.short_name if i == 0 else f"{spec.short_name}.{i + 1}")] = op

    def _worker(self, spec: HandlerSpec, queue: Queue, dlq: Queue, retry: Any, concurrency: int) -> None:
        message = self._message(spec.short_name, spec.message_type, spec.codec, "validation")
        channel = self._queue_channel(queue, f"work queue {queue.name!r}")
        ref = self._add_message(channel, message)
        op: dict[str, Any] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": ref}],
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
            "x-amqpkit-handler": spec.name,
            "x-amqpkit-work-queue": {
                "concurrency": concurrency,
                "deadLetterQueue": dlq.name,
                "retry": retry.model_dump(mode="json"),
            },
        }
        if spec.description:
            op["summary"] = spec.description
        self.operations[self._operation_id(spec.short_name)] = op

    def _rpc(self, name: str, queue: Queue, specs: list[HandlerSpec]) -> None:
        requests = self._queue_channel(queue, f"RPC requests to {name!r}; the message type names the method")
        replies = self._channel_id(f"{name}.reply")
        self.channels[replies] = {
            "address": None,
            "title": f"replies from {name}",
            "description": "the caller's reply_to queue (RabbitMQ's direct reply-to by default), known at run time",
            "messages": {},
            "bindings": {
                "amqp": {"is": "queue", "queue": {"name": "amq.rabbitmq.reply-to", "durable": False,
                         "exclusive": True, "autoDelete": True, "vhost": self.vhost},
                         "bindingVersion": AMQP_BINDING_VERSION}
            },
        }  # fmt: skip
        error = self._error_message()
        error_ref = self._add_message(replies, error)
        for spec in specs:
            method = spec.options["method"]
            request = self._message(f"{method}.request", spec.message_type, spec.codec, "validation", method=method)
            reply = self._message(f"{method}.reply", spec.returns, spec.reply_codec, "serialization", rpc=True)
            request_ref = self._add_message(requests, request)
            reply_ref = self._add_message(replies, reply)
            op: dict[str, Any] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{requests}"},
                "messages": [{"$ref": request_ref}],
                "reply": {
                    "address": {"location": "$message.header#/replyTo", "description": "the request's reply_to"},
                    "channel": {"$ref": f"#/channels/{replies}"},
                    "messages": [{"$ref": reply_ref}, {"$ref": error_ref}],
                },
                "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
                "x-amqpkit-handler": spec.name,
                "x-amqpkit-rpc-method": method,
            }
            if spec.description:
                op["summary"] = spec.description
            self.operations[self._operation_id(f"{name}.{method}")] = op

    def _publisher(self, pub: PublisherSpec[Any]) -> None:
        codec = pub.codec if pub.codec is not None else _auto(pub.message)
        message = self._message(pub.name, pub.message, codec, "serialization")
        channel = self._exchange_channel(pub.exchange, pub.routing_key or None, None)
        ref = self._add_message(channel, message)
        op: dict[str, Any] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": ref}],
            "bindings": {
                "amqp": {
                    "deliveryMode": 2 if pub.persistent else 1,
                    "mandatory": pub.mandatory,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
        if pub.description:
            op["summary"] = pub.description
        self.operations[self._operation_id(pub.name)] = op

    # ------------------------------------------------------------------ channels

    def _exchange_channel(self, exchange: Exchange, key: str | None, binding: Binding | None) -> str:
        headers = binding.headers if binding is not None and binding.headers is not None else None
        routed_by_key = exchange.type in (ExchangeType.DIRECT, ExchangeType.TOPIC) and headers is None
        address = key if routed_by_key else None
        ident = ("exchange", exchange.name, address, tuple(sorted((headers or {}).items())))
        existing = self._channel_keys.get(ident)
        if existing is not None:
            return existing
        label = exchange.name or "default"
        channel_id = self._channel_id(f"{label}.{address}" if address else label)
        self._channel_keys[ident] = channel_id
        channel: dict[str, Any] = {
            "address": address,
            "title": f"{label} ({exchange.type})" + (f" {address}" if address else ""),
            "messages": {},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": exchange.name,
                        "type": "default" if exchange.is_default else str(exchange.type),
                        "durable": exchange.durable,
                        "autoDelete": exchange.auto_delete,
                        "vhost": self.vhost,
                    },
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
        if headers is not None:
            assert binding is not None
            channel["description"] = f"headers exchange: messages whose headers match {binding.match} of these"
            channel["x-amqpkit-headers"] = {"match": binding.match, "headers": dict(headers)}
        self.channels[channel_id] = channel
        return channel_id

    def _queue_channel(self, queue: Queue, description: str) -> str:
        ident = ("queue", queue.name)
        existing = self._channel_keys.get(ident)
        if existing is not None:
            return existing
        channel_id = self._channel_id(queue.name or "private")
        self._channel_keys[ident] = channel_id
        self.channels[channel_id] = {
            "address": queue.name or None,
            "description": description,
            "messages": {},
            "bindings": {"amqp": {"is": "queue", "queue": self._queue_binding(queue),
                                  "bindingVersion": AMQP_BINDING_VERSION}},
            "x-amqpkit-queue": self._queue_extension(queue),
        }  # fmt: skip
        return channel_id

    def _queue_binding(self, queue: Queue) -> dict[str, Any]:
        binding: dict[str, Any] = {
            "durable": queue.durable,
            "exclusive": queue.exclusive,
            "autoDelete": queue.auto_delete,
            "vhost": self.vhost,
        }
        if queue.name:
            binding = {"name": queue.name, **binding}
        return binding

    def _queue_extension(self, queue: Queue) -> dict[str, Any]:
        ext: dict[str, Any] = {
            "name": queue.name or None,
            "private": queue.server_named,
            "type": str(queue.type),
            "durable": queue.durable,
        }
        arguments = {k: v for k, v in queue.declare_arguments().items() if _jsonable(v)}
        if arguments:
            ext["arguments"] = arguments
        return ext

    def _channel_id(self, wanted: str) -> str:
        return _unique(_safe_id(wanted), self.channels)

    def _operation_id(self, wanted: str) -> str:
        return _unique(_safe_id(wanted), self.operations)

    # ------------------------------------------------------------------ messages

    def _message(
        self,
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
        message: dict[str, Any] = {
            "name": title,
            "title": _type_title(payload_type, name),
            "contentType": codec.content_type,
            "payload": {"type_": payload_type, "mode": mode},  # replaced by its schema in _fill_payloads
        }
        if method is not None or rpc:
            message["correlationId"] = {"location": "$message.header#/correlationId"}
        if method is not None:
            message["bindings"] = {"amqp": {"messageType": method, "bindingVersion": AMQP_BINDING_VERSION}}
        return message

    def _error_message(self) -> dict[str, Any]:
        return {
            "name": ERROR_MESSAGE,
            "title": "RPC error",
            "summary": "the method raised, or the request could not be served",
            "contentType": ERROR_CONTENT_TYPE,
            "correlationId": {"location": "$message.header#/correlationId"},
            "payload": ERROR_SCHEMA,
        }

    def _add_message(self, channel: str, message: dict[str, Any]) -> str:
        """Put ``message`` in components (once) and in ``channel``; the reference to it in the channel."""
        key = None
        for existing_key, existing in self.messages.items():
            if _same_message(existing, message):
                key = existing_key
                break
        if key is None:
            key = _unique(_safe_id(message["name"]), self.messages)
            self.messages[key] = message
            payload = message["payload"]
            if isinstance(payload, dict) and "type_" in payload:
                self._payload_types.append((key, payload["mode"], payload["type_"]))
        self.channels[channel]["messages"][key] = {"$ref": f"#/components/messages/{key}"}
        return f"#/channels/{channel}/messages/{key}"

    def _fill_payloads(self) -> None:
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


# ---------------------------------------------------------------------- YAML


def to_yaml(doc: Any) -> str:
    """``doc`` as YAML (block style; every string quoted as JSON does, which YAML reads the same)."""
    lines: list[str] = []
    _yaml(doc, 0, lines)
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value)


def _yaml(value: Any, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, dict) and value:
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{_scalar(str(key))}:")
                _yaml(item, indent + 2, lines)
            else:
                lines.append(f"{pad}{_scalar(str(key))}: {_inline(item)}")
    elif isinstance(value, list) and value:
        for item in value:
            if isinstance(item, dict | list) and item:
                nested: list[str] = []
                _yaml(item, indent + 2, nested)
                nested[0] = f"{pad}- {nested[0][indent + 2 :]}"  # the item's first line carries the dash
                lines.extend(nested)
            else:
                lines.append(f"{pad}- {_inline(item)}")
    else:
        lines.append(f"{pad}{_inline(value)}")


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


# ---------------------------------------------------------------------- helpers


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


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


def _auto(t: Any) -> Codec[Any]:
    from .codec import codec_for

    return codec_for(t)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
