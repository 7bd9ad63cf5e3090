"""Configuration: immutable pydantic models, one concern each.

Passwords never leave these objects in text form: ``repr()``, ``str()`` and
every message built from a URL go through :func:`redact_url`.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DEFAULT_BINDING_CHECK_INTERVAL",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_PUBLISH_TIMEOUT",
    "DEFAULT_URL",
    "BrokerSettings",
    "ReconnectPolicy",
    "TlsSettings",
    "redact_url",
]

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_HEARTBEAT = 10
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_PUBLISH_TIMEOUT = 30.0
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
DEFAULT_BINDING_CHECK_INTERVAL = 30.0


def redact_url(url: str) -> str:
    """``url`` with the password replaced by ``***`` (user, host, port and vhost kept)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparseable url>"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    if parts.username is not None:
        user = parts.username + (":***" if parts.password is not None else "")
        netloc = f"{user}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def host_port(url: str) -> str:
    """``host:port`` of an AMQP URL, with the scheme's default port filled in."""
    parts = urlsplit(url)
    default = 5671 if parts.scheme == "amqps" else 5672
    try:
        port = parts.port or default
    except ValueError:
        port = default
    return f"{parts.hostname or 'localhost'}:{port}"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class TlsSettings(_Frozen):
    """TLS for ``amqps://`` URLs. Verification is on unless turned off here."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class ReconnectPolicy(_Frozen):
    """Exponential backoff with jitter between connection attempts."""

    initial_delay: float = Field(default=0.1, gt=0)
    max_delay: float = Field(default=5.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1)
    jitter: float = Field(default=0.2, ge=0, description="seconds of random extra delay, at most")
    connect_attempts: int = Field(default=3, ge=1, description="rounds over every URL before connect() gives up")


class BrokerSettings(_Frozen):
    """Where the broker is and how to talk to it.

    ``url`` takes one AMQP URL or a list of them (cluster nodes, tried in
    order on connect and on every reconnect).
    """

    urls: tuple[str, ...] = Field(default=(DEFAULT_URL,), min_length=1)
    heartbeat: int = Field(default=DEFAULT_HEARTBEAT, ge=0, description="seconds; 0 turns heartbeats off")
    connect_timeout: float = Field(default=DEFAULT_CONNECT_TIMEOUT, gt=0)
    publish_timeout: float = Field(default=DEFAULT_PUBLISH_TIMEOUT, gt=0)
    connection_name: str | None = None
    tls: TlsSettings | None = None
    max_message_size: int = Field(default=DEFAULT_MAX_MESSAGE_SIZE, gt=0)
    reconnect: ReconnectPolicy = ReconnectPolicy()
    binding_check_interval: float = Field(
        default=DEFAULT_BINDING_CHECK_INTERVAL,
        ge=0,
        description="seconds between two binds again of the bindings of the queues this Broker consumes: an "
        "exchange deleted and made again has lost them (one queue.bind per binding each time); 0: never",
    )
    loop_block_warning: float | None = Field(
        default=None,
        ge=0,
        description="seconds the event loop may be blocked before the watchdog names the culprit; "
        "None: a quarter of the heartbeat; 0: no watchdog",
    )

    @model_validator(mode="before")
    @classmethod
    def _accept_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and "url" in data:
            data = dict(data)
            url = data.pop("url")
            if "urls" in data:
                raise ValueError("give url or urls, not both")
            data["urls"] = (url,) if isinstance(url, str) else tuple(url)
        return data

    @field_validator("urls", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("urls")
    @classmethod
    def _check_scheme(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            scheme = urlsplit(url).scheme
            if scheme not in ("amqp", "amqps"):
                raise ValueError(f"not an AMQP URL: {redact_url(url)} (scheme must be amqp or amqps)")
        return urls

    def __init__(self, url: str | Sequence[str] | None = None, **data: Any) -> None:
        if url is not None:
            data["url"] = url
        super().__init__(**data)

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Settings from ``AMQP_URL`` (comma-separated for several nodes), else the local default."""
        raw = os.environ.get("AMQP_URL", "").strip()
        if raw and "url" not in overrides and "urls" not in overrides:
            overrides["urls"] = tuple(u.strip() for u in raw.split(",") if u.strip())
        return cls(**overrides)

    @property
    def loop_block_threshold(self) -> float:
        """The watchdog's threshold in seconds (0: off): ``loop_block_warning``, else a quarter of the heartbeat."""
        if self.loop_block_warning is not None:
            return self.loop_block_warning
        return (self.heartbeat or DEFAULT_HEARTBEAT) / 4

    @property
    def safe_urls(self) -> tuple[str, ...]:
        return tuple(redact_url(u) for u in self.urls)

    def __repr_args__(self) -> Any:
        for key, value in super().__repr_args__():
            yield key, (self.safe_urls if key == "urls" else value)
