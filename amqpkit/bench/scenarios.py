"""The scenarios ``amqpkit bench`` knows: what each one is, how it is measured, what it needs.

The sides themselves live in :mod:`.servers` and :mod:`.clients` (AMQP),
:mod:`.peers` (HTTP and gRPC) and :mod:`.chain` (a chain of three services).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from . import chain, clients, peers, servers
from .base import ClientOptions, ClientSide, Kind, ServerOptions, ServerSide, Window

__all__ = [
    "ALIASES", "CLIENTS", "SCENARIOS", "SERVERS", "ClientOptions", "ClientSide", "Kind", "MissingDependency",
    "Scenario", "ServerOptions", "ServerSide", "Window", "expand", "is_rpc", "kind_of", "require",
]  # fmt: skip

EXTRA_HINT = "pip install 'amqpkit[bench]' (the quick start's scripts/setup.sh installs it)"


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    kind: Kind
    server: type[ServerSide]
    client: type[ClientSide]
    what: str
    needs: tuple[str, ...] = ()  # importable modules, from the bench extra
    chain: bool = False


_ALL = (
    Scenario("rpc", Kind.CALL, servers.AmqpkitRpcServer, clients.AmqpkitRpcClient,
             "RpcClient -> RpcServer over direct reply-to"),
    Scenario("rpc-reply-queue", Kind.CALL, servers.AmqpkitRpcServer, clients.AmqpkitReplyQueueClient,
             "the same over an exclusive reply queue"),
    Scenario("oneway", Kind.ONEWAY, servers.AmqpkitOnewayConsumer, clients.AmqpkitOnewayPublisher,
             "Publisher (no confirm, transient) -> Subscriber (auto-ack)"),
    Scenario("oneway-confirmed", Kind.ONEWAY, servers.AmqpkitConfirmedConsumer, clients.AmqpkitConfirmedPublisher,
             "persistent, publisher confirms, manual acks, durable queue"),
    Scenario("raw-rpc", Kind.CALL, servers.RawRpcServer, clients.RawRpcClient, "rpc on bare aiormq"),
    Scenario("raw-rpc-wire", Kind.CALL, servers.RawRpcWireServer, clients.RawRpcWireClient,
             "rpc on bare aiormq, sending the properties amqpkit's request and reply carry"),
    Scenario("raw-oneway", Kind.ONEWAY, servers.RawOnewayConsumer, clients.RawOnewayPublisher,
             "oneway on bare aiormq"),
    Scenario("aiopika-rpc", Kind.CALL, servers.AiopikaRpcServer, clients.AiopikaRpcClient,
             "aio-pika's RPC pattern (JSON)"),
    Scenario("workqueue", Kind.ONEWAY, servers.AmqpkitWorkQueueWorker, clients.AmqpkitWorkQueueProducer,
             "WorkQueue.enqueue (persistent, confirmed, quorum) -> Worker, async def handler"),
    Scenario("workqueue-sync", Kind.ONEWAY, servers.SyncWorkQueueWorker, clients.AmqpkitWorkQueueProducer,
             "the same, a plain def handler in the worker's thread pool"),
    Scenario("workqueue-process", Kind.ONEWAY, servers.ProcessWorkQueueWorker, clients.AmqpkitWorkQueueProducer,
             "the same def with executor='process': one process per CPU"),
    Scenario("aiopika-workqueue", Kind.ONEWAY, servers.AiopikaConsumer, clients.AiopikaProducer,
             "bare aio-pika, confirmed persistent publish, consume and ack on a quorum queue"),
    Scenario("http-rpc-aiohttp", Kind.CALL, peers.HttpServer, peers.AiohttpClient,
             "HTTP/1.1 POST, kept alive: aiohttp client -> uvicorn + Starlette",
             ("uvicorn", "starlette", "aiohttp")),
    Scenario("http-rpc-httpx", Kind.CALL, peers.HttpServer, peers.HttpxClient,
             "HTTP/1.1 POST, kept alive: httpx client -> uvicorn + Starlette",
             ("uvicorn", "starlette", "httpx")),
    Scenario("grpc-rpc", Kind.CALL, peers.GrpcServer, peers.GrpcClient,
             "gRPC unary call, grpcio's asyncio API, raw bytes", ("grpc",)),
    Scenario("chain-rpc", Kind.CALL, chain.ChainRpcService, chain.ChainRpcClient,
             "A -> B -> C -> D, each an amqpkit RPC call", chain=True),
    Scenario("chain-events", Kind.EVENTS, chain.ChainEventsService, chain.ChainEventsClient,
             "A publishes; B, C, D react to events; A hears the last", chain=True),
    Scenario("chain-http", Kind.CALL, chain.ChainHttpService, chain.ChainHttpClient,
             "A -> B -> C -> D, each an HTTP call (aiohttp -> uvicorn + Starlette)",
             ("uvicorn", "starlette", "aiohttp"), chain=True),
)  # fmt: skip

REGISTRY: dict[str, Scenario] = {s.name: s for s in _ALL}
SCENARIOS = tuple(REGISTRY)
SERVERS: dict[str, type[ServerSide]] = {s.name: s.server for s in _ALL}
CLIENTS: dict[str, type[ClientSide]] = {s.name: s.client for s in _ALL}
# A name that stands for several scenarios: both HTTP clients against the same kind of server.
ALIASES: dict[str, tuple[str, ...]] = {"http-rpc": ("http-rpc-aiohttp", "http-rpc-httpx")}
VALID_NAMES = (*SCENARIOS, *ALIASES)


class MissingDependency(RuntimeError):
    """A scenario needs a library of the ``bench`` extra that is not installed."""


def expand(names: tuple[str, ...]) -> tuple[str, ...]:
    """Aliases replaced by what they stand for, duplicates dropped, order kept; ValueError on an unknown name."""
    unknown = [n for n in names if n not in REGISTRY and n not in ALIASES]
    if unknown:
        listed = ", ".join(repr(u) for u in unknown)
        raise ValueError(f"unknown scenario {listed}; valid: {', '.join(VALID_NAMES)}")
    out: dict[str, None] = {}
    for name in names:
        for one in ALIASES.get(name, (name,)):
            out[one] = None
    return tuple(out)


def require(names: tuple[str, ...], *, loop: str = "asyncio") -> None:
    """Raise :class:`MissingDependency` naming the extra when a scenario's (or the loop's) library is missing."""
    wanted: dict[str, list[str]] = {}
    for name in names:
        for module in REGISTRY[name].needs:
            wanted.setdefault(module, []).append(name)
    if loop == "uvloop":
        wanted.setdefault("uvloop", []).append("--loop uvloop")
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    if missing:
        users = sorted({u for m in missing for u in wanted[m]})
        shown = ["grpcio" if m == "grpc" else m for m in missing]
        raise MissingDependency(f"{', '.join(users)} needs {', '.join(shown)}, from the bench extra: {EXTRA_HINT}")


def kind_of(scenario: str) -> Kind:
    return REGISTRY[scenario.split("@", 1)[0]].kind


def is_rpc(scenario: str) -> bool:
    """Measured by the caller (a call, or a request through the event chain), not by a consumer."""
    return kind_of(scenario) is not Kind.ONEWAY


def is_chain(scenario: str) -> bool:
    return REGISTRY[scenario.split("@", 1)[0]].chain
