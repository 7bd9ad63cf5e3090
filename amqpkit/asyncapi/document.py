"""The AsyncAPI document of a service: servers, channels and operations from the pattern objects it is made of.

:func:`asyncapi_document` builds the service's plan (checked, not started)
and walks it: each subscriber binding, worker and RPC method becomes a
``receive`` operation, each declared publisher a ``send``; their channels are
exchanges with a routing key or queues. The messages and their schemas are
:mod:`.messages`'.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote, urlsplit

from ..codec import codec_for
from ..connection import Broker
from ..service import HandlerSpec, PublisherSpec, Service
from ..service.plan import Plan, build_plan
from ..settings import BrokerSettings
from ..topology import Binding, Exchange, ExchangeType, Queue
from .messages import AMQP_BINDING_VERSION, Messages, component_id, error_message, message

ASYNCAPI_VERSION = "3.0.0"
SECURITY_SCHEME = "user-password"


def asyncapi_document(service: Service, settings: BrokerSettings | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of ``service`` (a dict ready for JSON); checks the service first."""
    settings = settings or service.settings or BrokerSettings()
    plan = build_plan(service, Broker(settings), None)
    return _Builder(service, settings).build(plan)


class _Builder:
    def __init__(self, service: Service, settings: BrokerSettings) -> None:
        self.service = service
        self.settings = settings
        self.vhost = _vhost(settings.urls[0])
        self.channels: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.components = Messages()
        self._channel_keys: dict[tuple[Any, ...], str] = {}

    def build(self, plan: Plan) -> dict[str, Any]:
        for spec, sub in plan.subscribers:
            self._subscriber(spec, sub.exchange, sub.queue, sub.bindings)
        for spec, work, worker in plan.workers:
            self._worker(spec, work.queue, work.dlq, work.retry, worker.concurrency)
        for name, (server, specs) in plan.servers.items():
            self._rpc(name, server.queue, specs)
        for pub in self.service.publishers:
            self._publisher(pub)
        self.components.fill_payloads()
        doc: dict[str, Any] = {
            "asyncapi": ASYNCAPI_VERSION,
            "info": self._info(),
            "servers": self._servers(),
            "defaultContentType": "application/json",
            "channels": self.channels,
            "operations": self.operations,
            "components": {
                "messages": self.components.messages,
                "schemas": self.components.schemas,
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
        msg = message(spec.short_name, spec.message_type, spec.codec, "validation")
        queue_ext = self._queue_extension(queue)
        routes: list[tuple[str | None, Binding | None]] = [(b.routing_key, b) for b in bindings]
        if not routes:  # the default exchange: routed by the queue's name
            routes = [(queue.name or None, None)]
        for i, (key, binding) in enumerate(routes):
            channel = self._exchange_channel(exchange, key, binding)
            ref = self._add_message(channel, msg)
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
        msg = message(spec.short_name, spec.message_type, spec.codec, "validation")
        channel = self._queue_channel(queue, f"work queue {queue.name!r}")
        ref = self._add_message(channel, msg)
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
        error_ref = self._add_message(replies, error_message())
        for spec in specs:
            method = spec.options["method"]
            request = message(f"{method}.request", spec.message_type, spec.codec, "validation", method=method)
            reply = message(f"{method}.reply", spec.returns, spec.reply_codec, "serialization", rpc=True)
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
        codec = pub.codec if pub.codec is not None else codec_for(pub.message)
        msg = message(pub.name, pub.message, codec, "serialization")
        channel = self._exchange_channel(pub.exchange, pub.routing_key or None, None)
        ref = self._add_message(channel, msg)
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
        return component_id(wanted, self.channels)

    def _operation_id(self, wanted: str) -> str:
        return component_id(wanted, self.operations)

    def _add_message(self, channel: str, msg: dict[str, Any]) -> str:
        """Put ``msg`` in components (once) and in ``channel``; the reference to it in the channel."""
        key = self.components.add(msg)
        self.channels[channel]["messages"][key] = {"$ref": f"#/components/messages/{key}"}
        return f"#/channels/{channel}/messages/{key}"


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
