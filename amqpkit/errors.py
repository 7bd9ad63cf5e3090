"""Exceptions raised by amqpkit.

Every exception amqpkit raises on purpose derives from :class:`AmqpkitError`.
Errors from aio-pika and aiormq never reach user code: they are translated at
one boundary, :func:`map_exceptions`, and chained (``raise ... from exc``).

The hierarchy::

    AmqpkitError
    ├── ConnectError          no broker in the list could be reached
    │   └── AccessRefused     the broker refused the login or the vhost (also at a reconnect)
    ├── ConnectionLost        the connection dropped while an operation waited
    ├── TopologyError         a declare was refused (argument drift, bad spec)
    ├── PublishError          a publish did not reach a queue for sure
    │   ├── Unroutable        mandatory publish returned: no queue took it
    │   ├── PublishNacked     the broker nacked the publish
    │   ├── PublishTimeout    no confirm before the deadline (also TimeoutError)
    │   └── MessageTooLarge   over max_message_size: amqpkit's own, or the broker's
    ├── DecodeError           a body could not be turned into a value
    ├── SettlementError       a delivery was settled twice
    ├── HandlerCrashed        the pool process running a handler died before it returned
    └── RpcError              a remote call did not produce a result
        ├── RpcTimeout        no reply before the deadline (also TimeoutError)
        ├── NoResponder       no queue took the request
        └── RemoteError       the remote handler raised; carries its type and text
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import aiormq.exceptions

__all__ = [
    "AccessRefused",
    "AmqpkitError",
    "ChannelLimitReached",
    "ConnectError",
    "ConnectionLost",
    "DecodeError",
    "HandlerCrashed",
    "MessageTooLarge",
    "NoResponder",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "RemoteError",
    "RpcError",
    "RpcTimeout",
    "SettlementError",
    "TopologyError",
    "Unroutable",
    "map_exceptions",
]


class AmqpkitError(Exception):
    """Root of every error amqpkit raises."""


class ConnectError(AmqpkitError):
    """Raised when every broker address failed on connect; names host and port, never the password.

    ``reason`` is ``"refused"`` when the broker refused the login (wrong user,
    password or vhost: not retried), ``"limit"`` when it allows the user or
    vhost no more connections (``max-connections``: retried, since another
    connection may close), else ``"unreachable"``.
    """

    def __init__(self, message: str, *, reason: str = "unreachable") -> None:
        super().__init__(message)
        self.reason = reason


class AccessRefused(ConnectError):
    """Raised when the broker refuses this Broker's login or its vhost: a wrong user or password, a user deleted,
    no permission on the vhost, a vhost that does not exist. Not the network: access has to be given back (or the
    settings changed). ``reason`` is ``"refused"``; the text has the broker's words, never the password.

    :meth:`Broker.connect() <amqpkit.Broker.connect>` raises it at once. A connected Broker whose reconnects are
    refused keeps trying with its backoff (access may be given back), and what waits for the connection meanwhile
    ends at its deadline with this error, which is then also the error it ends with otherwise: a confirmed
    publish's :class:`PublishTimeout`, an RPC call's :class:`RpcTimeout`, and :class:`ConnectionLost` for a
    consume, a declare or a get. ``Broker.access_refused`` says why while it lasts.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="refused")


class ConnectionLost(AmqpkitError):
    """Raised when the connection or channel dropped while an operation was waiting on it."""


class ChannelLimitReached(AmqpkitError):
    """Raised, without asking the broker, for a channel past a limit the Broker knows: the connection's
    negotiated ``channel_max``, or one the broker counts itself (a user's ``max-channels``), learned when it
    refused a channel.

    RabbitMQ answers a channel past either limit by closing the whole connection: that close is a
    :class:`ConnectionLost` (the Broker reconnects), and for a while after it the Broker asks for no more
    channels than it had then. A consumer left without a channel at a reconnect is not given up: it waits
    (``Consumer.waiting_for_channel``, ``Broker.detached_consumers()``) and is attached when there is room.
    ``limit`` is the number of channels the limit allows.
    """

    def __init__(self, message: str, *, limit: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class TopologyError(AmqpkitError):
    """Raised when the broker refuses a declare, e.g. a queue whose arguments differ from the live one."""

    def __init__(
        self,
        message: str,
        *,
        kind: str = "queue",
        name: str = "",
        argument: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name
        self.argument = argument


class PublishError(AmqpkitError):
    """Raised when a publish is not known to have reached a queue."""


class Unroutable(PublishError):
    """Raised when a mandatory publish was returned because no queue was bound for it."""

    def __init__(self, exchange: str, routing_key: str, reply_text: str = "NO_ROUTE") -> None:
        shown = exchange or "(default exchange)"
        super().__init__(f"unroutable: exchange {shown!r} routing key {routing_key!r}: {reply_text}")
        self.exchange = exchange
        self.routing_key = routing_key
        self.reply_text = reply_text


class PublishNacked(PublishError):
    """Raised when the broker answered the publish with basic.nack.

    A nack is for the whole publish: routed to several queues and refused by one (full under reject-publish, say),
    the others took it all the same. ``sends`` counts the sends that were nacked: 2 when
    :meth:`Broker.publish <amqpkit.Broker.publish>` sent it once more on a fresh channel, and then a queue that
    took it holds it twice (more, if a lost connection made it send again in between). A caller that publishes
    it again adds one more copy to those queues.
    """

    def __init__(self, message: str, *, sends: int = 1) -> None:
        super().__init__(message)
        self.sends = sends


class PublishTimeout(PublishError, TimeoutError):
    """Raised when no confirm arrived before the publish deadline (broker blocked, or unreachable)."""


class InvalidMessage(PublishError, ValueError):
    """Raised before publishing a message AMQP cannot carry as it is (nothing of it was sent).

    A property too long or out of range (a message id over 255 bytes, a priority over 255, an expiration that
    is not a finite number of seconds), a header name over 128 bytes, or a header value of a type AMQP has no
    field type for. The message names the property or header, never a header's value.
    """


class MessageTooLarge(PublishError):
    """Raised before publishing when a body is larger than ``BrokerSettings.max_message_size``; or, with
    ``by_broker``, when the broker refused it for its size (its own ``max_message_size``, lower than amqpkit's)."""

    def __init__(self, size: int, limit: int, *, by_broker: bool = False) -> None:
        if by_broker:
            text = f"the broker refused a message body of {size} bytes, over its max_message_size of {limit} bytes"
        else:
            text = f"message body is {size} bytes, over the limit of {limit} bytes"
        super().__init__(text)
        self.size = size
        self.limit = limit
        self.by_broker = by_broker


_NACK_CAUSES = (
    "a queue it was routed to refused it, most often one full under a length limit (max-length or "
    "max-length-bytes, its own or a policy's: rabbitmqctl list_policies, list_operator_policies) with overflow "
    "reject-publish; or a quorum queue without a leader. Other queues it was routed to took it if they could "
    "(a nack is for the whole publish)"
)

_SIZE_REFUSAL = re.compile(r"message size \d+ is larger than (?:configured )?max size (\d+)")  # 3.10 to 4.x


def broker_size_limit(exc: BaseException) -> int | None:
    """The broker's ``max_message_size``, when ``exc`` or one of its causes is the broker closing a channel over
    a body larger than that (in RabbitMQ's words); None for any other error."""
    seen: BaseException | None = exc
    while seen is not None:
        found = _SIZE_REFUSAL.search(str(seen))
        if found is not None:
            return int(found[1])
        seen = seen.__cause__
    return None


# RabbitMQ's words for a publish its permissions refuse (403 ACCESS_REFUSED, 3.10 to 4.x): a write permission on
# the exchange ("access to exchange 'X' in vhost ..."), or a topic permission on the exchange and routing key
# ("access to topic 'K' in exchange 'X' in vhost ..."). The broker cuts its reply text at 255 bytes, so a long
# key or exchange name may end in the middle.
_ACCESS_REFUSAL = re.compile(r"access to (topic|exchange) '")


def publish_refused_for(exc: BaseException) -> tuple[str | None, str | None, bool] | None:
    """What a permission refusal names, when ``exc`` or one of its causes is the broker closing a channel over a
    publish it may not make: (exchange, routing key, cut). ``cut`` means the text ended within a name: the last one
    given is only its beginning, and the exchange is None when the text ended within the key. The key is None for
    a write permission. The default exchange is ``amq.default`` in RabbitMQ's words. None for any other error."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        found = _ACCESS_REFUSAL.search(text)
        if found is not None:
            rest = text[found.end() :]
            if found[1] == "topic":
                topic, sep, rest = rest.partition("' in exchange '")
                if not sep:  # cut within the key, or just after it (then the whole key is there)
                    whole, quote, _ = topic.partition("'")
                    return None, (whole if quote else _uncut(topic)), True
            else:
                topic = None
            exchange, sep, _ = rest.partition("'")
            return (exchange, topic, False) if sep else (_uncut(exchange), topic, True)
        seen = seen.__cause__
    return None


def refusal_is_for(refused: tuple[str | None, str | None, bool], exchange: str, routing_key: str) -> bool | None:
    """Whether a refusal (:func:`publish_refused_for`) is of a publish to ``exchange`` with ``routing_key``: True,
    False, or None when a cut text cannot tell (its names begin like these)."""
    named_exchange, topic, cut = refused
    exchange = exchange or "amq.default"
    if not cut:
        return named_exchange == exchange and topic in (None, routing_key)
    if named_exchange is None:  # cut within the key
        return None if topic is not None and routing_key.startswith(topic) else False
    if topic is None:  # cut within the exchange of a write refusal
        return None if exchange.startswith(named_exchange) else False
    return None if topic == routing_key and exchange.startswith(named_exchange) else False


def access_refused(exc: BaseException) -> bool:
    """Whether ``exc`` or one of its causes is the broker refusing access (403 ACCESS_REFUSED): the user's
    permissions (configure, write, read), a vhost being deleted, or a queue in exclusive use by another consumer.
    Each may be lifted without a change on this side (rights given back, the vhost made again, the other
    consumer gone): a consumer refused so at a reconnect waits and is tried again (see Consumer.error)."""
    return caused_by(exc, aiormq.exceptions.ChannelAccessRefused) is not None


def queue_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` or one of its causes is the broker's 404 for a durable queue it has but cannot serve now:
    "home node ... of durable queue ... is down or inaccessible". A node that has just started says it of its
    own streams until their members are back (RabbitMQ 4.0.5: a few seconds); a cluster says it of a queue whose
    node is down. Either passes without a change on this side, so it is waited out, not taken for a deletion."""
    return not_found_saying(exc, "is down or inaccessible")


def not_found_saying(exc: BaseException, words: str) -> bool:
    """Whether ``exc`` or one of its causes is the broker's 404 NOT_FOUND with ``words`` in its text ("no queue",
    "no exchange": what it did not find)."""
    not_found = caused_by(exc, aiormq.exceptions.ChannelNotFoundEntity)
    return not_found is not None and words in reply_text(not_found)


_E = TypeVar("_E", bound=BaseException)


def caused_by(exc: BaseException, kind: type[_E]) -> _E | None:
    """``exc`` or the first of its causes (map_exceptions chains the broker's error as the cause) that is a ``kind``;
    None if none is."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__
    return None


_SERVER_NAMED = re.compile(r"amq\.gen-[\w-]+")


def same_refusal(one: BaseException | None, other: BaseException) -> bool:
    """Whether two refusals say the same, but for the name the broker gives a server-named queue (a new one at
    each declare): a refusal repeated at each attempt is said once."""
    return one is not None and _SERVER_NAMED.sub("amq.gen-", str(one)) == _SERVER_NAMED.sub("amq.gen-", str(other))


def _uncut(name: str) -> str:
    # ... and the half of a character the cut left, read as U+FFFD
    return name.removesuffix("...").rstrip("\ufffd")


class DecodeError(AmqpkitError):
    """Raised when a body has an unaccepted content type, is not valid for its codec, or fails the schema."""

    def __init__(self, message: str, *, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class SettlementError(AmqpkitError):
    """Raised when a delivery that was already acked, nacked or rejected is settled again."""


class HandlerCrashed(AmqpkitError):
    """Raised for a task whose pool process died before it returned (``os._exit``, a signal, the OOM killer).

    Only that task fails (it then follows the retry policy like any failure);
    the pool starts a fresh process in its place. ``exitcode`` is the dead
    process's exit status when known (negative: killed by that signal).
    """

    def __init__(self, message: str, *, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


class RpcError(AmqpkitError):
    """Raised when a remote call ends without a result."""


class RpcTimeout(RpcError, TimeoutError):
    """Raised when no reply arrived before the call's deadline."""


class NoResponder(RpcError):
    """Raised when no queue took the request (the mandatory publish was returned)."""


class RemoteError(RpcError):
    """Raised when the remote handler raised; ``remote_type`` and ``remote_message`` say what."""

    def __init__(self, remote_type: str, remote_message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.details = details or {}


class _RefusedPublish(AccessRefused, PublishTimeout):
    """A confirmed publish whose deadline came while the broker refused the reconnect's login."""


class _RefusedCall(AccessRefused, RpcTimeout):
    """An RPC call whose deadline came while the broker refused the reconnect's login."""


class _RefusedWait(AccessRefused, ConnectionLost):
    """A consume, declare or get whose wait for the connection ended while the broker refused the reconnect's login."""


class _NotBackInTime(ConnectionLost, TimeoutError):
    """``Broker.wait_connected(timeout)`` past its timeout: still disconnected (a TimeoutError, as it was before)."""


class _RefusedNotBack(AccessRefused, _NotBackInTime):
    """``Broker.wait_connected(timeout)`` past its timeout while the broker refused the reconnect's login."""


_REFUSED_AS = {
    PublishTimeout: _RefusedPublish,
    RpcTimeout: _RefusedCall,
    ConnectionLost: _RefusedWait,
    _NotBackInTime: _RefusedNotBack,
}


def refused_error(
    otherwise: type[PublishTimeout | RpcTimeout | ConnectionLost | _NotBackInTime], message: str
) -> AccessRefused:
    """:class:`AccessRefused` for a wait that would otherwise end with ``otherwise``, and is that too (code that
    catches it, and not this, goes on as it did)."""
    return _REFUSED_AS[otherwise](message)


_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for (queue|exchange) '([^']*)'")
# the live type in that refusal: 4.x "current is 'quorum'", 3.10 "current is the value 'quorum' of type ...", and
# 3.10's "current is none" for a queue declared without one (classic: a default queue type writes its type down)
_CURRENT = re.compile(r"current is (?:the value )?'(classic|quorum|stream)'|current is (none)")


@contextmanager
def map_exceptions(*, kind: str = "", name: str = "") -> Iterator[None]:
    """Translate aiormq exceptions raised in the block into amqpkit ones.

    ``kind`` and ``name`` describe the object being worked on (e.g. ``queue``,
    ``orders``) so that a refused declare names it.
    """
    try:
        yield
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        text = reply_text(exc)
        match = _INEQUIVALENT.search(text)
        if match:
            argument, found_kind, found_name = match.groups()
            hint = ""
            if argument == "x-queue-type":
                current = _CURRENT.search(text)  # not there when the broker cut its text short (255 bytes)
                live = "..." if current is None else repr(current.group(1) or "classic")
                hint = (
                    f"; declare it with the type it has (Queue({found_name!r}, type={live})), or delete it "
                    "(a vhost's default queue type makes a queue declared without a type one of that type)"
                )
            raise TopologyError(
                f"{found_kind} {found_name!r} exists with a different {argument!r}: {text}{hint}",
                kind=found_kind,
                name=found_name,
                argument=argument,
            ) from exc
        raise TopologyError(f"{kind} {name!r} refused: {text}", kind=kind, name=name) from exc
    except (
        aiormq.exceptions.ChannelAccessRefused,
        aiormq.exceptions.ChannelNotFoundEntity,
        aiormq.exceptions.ChannelLockedResource,
    ) as exc:
        raise TopologyError(f"{kind} {name!r}: {reply_text(exc)}", kind=kind, name=name) from exc
    except aiormq.exceptions.PublishError as exc:
        frame = exc.frame
        raise Unroutable(
            getattr(frame, "exchange", "") or "",
            getattr(frame, "routing_key", "") or "",
            getattr(frame, "reply_text", "") or "NO_ROUTE",
        ) from exc
    except aiormq.exceptions.DeliveryError as exc:
        raise PublishNacked(f"broker nacked the publish to {name!r}: {_NACK_CAUSES}") from exc
    except (
        aiormq.exceptions.AMQPConnectionError,
        aiormq.exceptions.ChannelClosed,
        aiormq.exceptions.ChannelInvalidStateError,
        ConnectionError,
    ) as exc:
        raise ConnectionLost(f"connection lost: {reply_text(exc)}") from exc
    except RuntimeError as exc:
        # aiormq's Connection.channel() on a connection that closed while we awaited it
        # raises a bare RuntimeError("<Connection ...> closed").
        if str(exc).endswith(" closed"):
            raise ConnectionLost("connection lost: closed while opening a channel") from exc
        raise


# RabbitMQ 4.x configured to deny a deprecated feature (deprecated_features.permit.X = false) closes the whole
# connection at its use, 541 INTERNAL_ERROR "Feature `X` is deprecated. Its use is not permitted ..." (4.0.5).
_DEPRECATED_DENIED = re.compile(r"Feature `(\w+)` is deprecated\.\s+Its use is not permitted")
_INSTEAD = {
    "transient_nonexcl_queues": "declare it durable, or exclusive (a connection's own)",
    "queue_master_locator": "leave out the x-queue-master-locator argument (x-queue-leader-locator replaces it)",
}


def denied_feature(exc: BaseException) -> str | None:
    """The deprecated feature the broker closed the connection over, when ``exc`` (or a cause of it) says so."""
    seen: BaseException | None = exc
    while seen is not None:
        found = _DEPRECATED_DENIED.search(reply_text(seen))
        if found is not None:
            return found[1]
        seen = seen.__cause__
    return None


def deprecated_denied(kind: str, name: str, feature: str) -> TopologyError:
    """A declare the broker answered by closing the connection over a deprecated feature it denies: not a passing
    fault (every retry would cut the connection again), so a TopologyError that names the feature."""
    instead = _INSTEAD.get(feature, "see RabbitMQ's deprecated features")
    return TopologyError(
        f"{kind} {name!r} refused: it uses {feature}, a deprecated feature this RabbitMQ denies "
        f"(deprecated_features.permit.{feature} = false), and the broker closed the connection over it; {instead}",
        kind=kind,
        name=name,
    )


def reply_text(exc: BaseException) -> str:
    """The broker's reply text of an aiormq exception, without the exception noise."""
    for arg in exc.args:
        if isinstance(arg, str) and arg:
            return arg
    frame = getattr(exc, "frame", None)
    text = getattr(frame, "reply_text", None)
    if isinstance(text, str) and text:
        return text
    return type(exc).__name__


ERROR_TEXT_SHOWN = 500  # characters of an exception's text a log line or task event shows


def brief(exc: BaseException) -> str:
    """``Type: text`` for a log line or a task event, the text cut to :data:`ERROR_TEXT_SHOWN` characters: a
    handler's exception may carry a whole body in its message (a 2 MB product id made a 2 MB WARNING line)."""
    text = str(exc)
    if len(text) > ERROR_TEXT_SHOWN:
        text = f"{text[:ERROR_TEXT_SHOWN]}... ({len(text) - ERROR_TEXT_SHOWN} more characters)"
    return f"{type(exc).__name__}: {text}"
