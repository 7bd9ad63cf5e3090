"""What an amqpkit RPC request and reply carry: content types, headers, the error document.

RpcServer (rpc_server.py) and RpcClient (rpc_client.py) agree through these
names; any server or client that follows them interoperates (the official
tutorial's conventions plus a typed error reply and a relative deadline).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import RemoteError

__all__ = [
    "DEFAULT_RPC_TIMEOUT",
    "DIRECT_REPLY_TO",
    "ERROR_CONTENT_TYPE",
    "TIMEOUT_HEADER",
    "error_body",
    "parse_error",
]

ERROR_CONTENT_TYPE = "application/vnd.amqpkit.error+json"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
TIMEOUT_HEADER = "x-timeout-ms"
DEFAULT_RPC_TIMEOUT = 30.0
DEFAULT_CONCURRENCY = 32


def error_body(error_type: str, message: str, details: Mapping[str, Any] | None = None) -> bytes:
    doc: dict[str, Any] = {"type": error_type, "message": message}
    if details:
        doc["details"] = dict(details)
    return json.dumps({"error": doc}, default=str).encode()


def parse_error(body: bytes) -> RemoteError:
    try:
        doc = json.loads(body)["error"]
        return RemoteError(str(doc["type"]), str(doc["message"]), doc.get("details"))
    except (ValueError, KeyError, TypeError):
        return RemoteError("UnreadableError", body[:200].decode("utf-8", "replace"))


# ---------------------------------------------------------------------- server
