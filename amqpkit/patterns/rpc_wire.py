"""What an amqpkit RPC request and reply carry: content types, headers, the error document.

RpcServer (rpc_server.py) and RpcClient (rpc_client.py) agree through these
names; any server or client that follows them interoperates (the official
tutorial's conventions plus a typed error reply and a relative deadline).
"""

from __future__ import annotations

import base64
import binascii
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
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested too deeply
        return RemoteError("UnreadableError", body[:200].decode("utf-8", "replace"))


# ---------------------------------------------------------------------- server


# Erlang's external term format, as far as a direct reply-to name holds it: a pid, whose node is an atom.
_VERSION, _NEW_PID, _PID = 131, 88, 103
_ATOM_LENGTH_BYTES = {118: 2, 100: 2, 119: 1, 115: 1}  # ATOM_UTF8, ATOM, SMALL_ATOM_UTF8, SMALL_ATOM


def safe_reply_to(name: str) -> bool:
    """Whether a reply sent to ``name`` cannot make the broker close the sender's whole connection.

    A name under ``amq.rabbitmq.reply-to.`` is a direct reply-to address: the base64 of the caller's channel pid
    (Erlang's external term format), a dot, and the base64 of a key. RabbitMQ decodes it when a reply is
    published there, and one it cannot decode closes the publisher's connection with 541 INTERNAL_ERROR, on 3.10
    and on 4.0 (``amq.rabbitmq.reply-to.Zm9v.abc``, in a hunt): every consumer and publisher of that Broker cut,
    each time such a request is answered. This checks the form: a pid term of exact length, a base64 key. A name
    that is not two parts between dots (``...reply-to.x``, ``...reply-to.a.b.c``, ``...reply-to..x``) the broker
    ignores (probed on 3.10.8 and 4.0.5), and so does this. RabbitMQ 3.10 also closes the connection for a
    well-formed pid of a node it does not know (a name from another cluster); 4.0 drops that reply. Any other
    name is a queue's, and a reply routed nowhere is dropped."""
    prefix = DIRECT_REPLY_TO + "."
    if not name.startswith(prefix):
        return True
    parts = [part for part in name[len(prefix) :].split(".") if part]
    if len(parts) != 2:
        return True  # the broker takes it for no direct reply-to address, and drops the reply
    pid, key = parts
    try:
        term = base64.b64decode(pid, validate=True)
        base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        return False
    if len(term) < 3 or term[0] != _VERSION or term[1] not in (_NEW_PID, _PID):
        return False
    width = _ATOM_LENGTH_BYTES.get(term[2])
    if width is None or len(term) < 3 + width:
        return False
    atom_end = 3 + width + int.from_bytes(term[3 : 3 + width], "big")
    rest = 4 + 4 + (4 if term[1] == _NEW_PID else 1)  # ID, serial, creation
    return len(term) == atom_end + rest
