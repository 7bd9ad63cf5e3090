"""Request/reply over AMQP: :class:`RpcServer` and :class:`RpcClient`.

A request is a message on the server's queue with ``reply_to`` and
``correlation_id``; its ``type`` names the method. The reply goes to
``reply_to`` with the same ``correlation_id``: the handler's return value
encoded with its codec, or an error document under :data:`ERROR_CONTENT_TYPE`.

Every call ends: with the result, a typed error (:class:`~amqpkit.RemoteError`,
:class:`~amqpkit.NoResponder`, :class:`~amqpkit.ConnectionLost`) or
:class:`~amqpkit.RpcTimeout` at its deadline. The request carries the time
left until then as a relative budget, stamped when it is sent: the message
expiration (the broker drops a request still queued when it runs out) and an
``x-timeout-ms`` header. No absolute time is sent or trusted, so the client's
and the server's clocks need not agree: a server with a clock ahead of the
client's does not skip requests the caller still waits for.

Replies come back over RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``)
by default: no reply queue to declare, one consumer per client channel. Its
replies are at-most-once: a reply to a client that has gone is dropped.
``reply_queue="exclusive"`` uses an exclusive server-named queue instead, as
the official tutorial does.
"""

from __future__ import annotations

from .rpc_client import RpcClient
from .rpc_server import RpcServer
from .rpc_wire import DEFAULT_CONCURRENCY as DEFAULT_CONCURRENCY
from .rpc_wire import DEFAULT_RPC_TIMEOUT, ERROR_CONTENT_TYPE
from .rpc_wire import DIRECT_REPLY_TO as DIRECT_REPLY_TO
from .rpc_wire import TIMEOUT_HEADER as TIMEOUT_HEADER

__all__ = ["DEFAULT_RPC_TIMEOUT", "ERROR_CONTENT_TYPE", "RpcClient", "RpcServer"]

# The layout: rpc_wire.py (what travels), rpc_server.py, rpc_client.py. The other names above stay
# importable from here, as they were when one module held both sides.
