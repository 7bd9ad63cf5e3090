"""Arguments out of range get a clear ValueError from amqpkit, before anything is sent, and the Broker goes on."""

from __future__ import annotations

import math

import pytest

from amqpkit import Broker, Exchange, Queue, RpcClient, RpcServer, Service, Subscriber, TopologyError, Worker, WorkQueue
from amqpkit.message import Delivery


async def _ignore(delivery: Delivery[bytes]) -> None:
    return None


@pytest.mark.parametrize("prefetch", [-1, 65536, 70000])
async def test_a_prefetch_amqp_cannot_carry_is_a_value_error(broker: Broker, name: str, prefetch: int) -> None:
    # Before: pamqp's TypeError "Short unsigned integer range: 0 to 65535", from the basic.qos being encoded,
    # after the queue had been declared.
    queue = Queue(f"{name}.q", auto_delete=True)
    with pytest.raises(ValueError, match="prefetch"):
        await broker.consume(queue, _ignore, prefetch=prefetch)
    assert not broker.remembers(queue) and broker.consumers == ()
    with pytest.raises(Exception):  # noqa: B017, PT011 - any refusal: the point is that it was never declared
        await broker.queue_counts(queue)
    consumer = await broker.consume(queue, _ignore, prefetch=65535)  # the largest AMQP carries
    await consumer.cancel()


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan])
async def test_a_call_timeout_that_is_not_positive_is_a_value_error(broker: Broker, name: str, timeout: float) -> None:
    # Before: RpcTimeout "not sent, the client was still starting", as if the broker had been slow.
    with pytest.raises(ValueError, match="timeout must be positive"):
        RpcClient(broker, f"{name}.rpc", timeout=timeout)
    client = RpcClient(broker, f"{name}.rpc")
    try:
        with pytest.raises(ValueError, match="timeout must be positive"):
            await client.call("m", 1, timeout=timeout)
    finally:
        await client.close()


async def _handler(value: int) -> None:
    return None


@pytest.mark.parametrize("concurrency", [0, -1, 65536])
async def test_a_concurrency_a_worker_or_server_cannot_keep_is_a_value_error(
    broker: Broker, name: str, concurrency: int
) -> None:
    # 0 was taken as the prefetch's "no limit": one worker took the whole backlog into memory and ran all of it
    # at once. Refused where it is given, before anything is declared.
    with pytest.raises(ValueError, match="concurrency"):
        Worker(WorkQueue(broker, f"{name}.work"), _handler, concurrency=concurrency)
    with pytest.raises(ValueError, match="concurrency"):
        RpcServer(broker, f"{name}.rpc", concurrency=concurrency, handlers={"m": _handler})
    assert not broker.remembers(Queue(f"{name}.work")) and not broker.remembers(Queue(f"{name}.rpc"))


async def test_a_subscriber_refuses_its_prefetch_before_it_declares_anything(broker: Broker, name: str) -> None:
    queue = Queue(f"{name}.sub", auto_delete=False)
    with pytest.raises(ValueError, match="prefetch"):
        Subscriber(broker, Exchange(f"{name}.x", type="fanout"), _handler, queue=queue, prefetch=70000)
    with pytest.raises(TopologyError):
        await broker.queue_counts(queue)


def test_a_service_refuses_a_concurrency_where_it_is_declared() -> None:
    svc = Service("bad-concurrency")
    with pytest.raises(ValueError, match="concurrency"):
        svc.worker("jobs", concurrency=0)
    with pytest.raises(ValueError, match="concurrency"):
        svc.rpc("calls", concurrency=70000)


@pytest.mark.parametrize(
    "arguments",
    [
        {"poll_interval": 0},  # looked again at once, for ever: a busy loop on the database while idle
        {"poll_interval": -1.0},
        {"poll_interval": math.nan},
        {"retention": -1.0},
        {"publish_timeout": 0},
        {"cleanup_interval": 0},
        {"retry_initial": 0},
        {"retry_max": -1.0},
        {"retry_jitter": 1.5},
        {"max_attempts": 0},
    ],
)
async def test_a_relay_refuses_values_it_cannot_run_with(broker: Broker, arguments: dict[str, float]) -> None:
    from amqpkit.outbox import Relay, SqliteStore

    with pytest.raises(ValueError, match=next(iter(arguments))):
        Relay(SqliteStore(":memory:"), broker, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [-1, -100])
async def test_a_negative_dead_letter_limit_is_a_value_error(broker: Broker, name: str, limit: int) -> None:
    # Before: an empty list, as if the DLQ held nothing.
    from amqpkit.patterns.dlq import list_dead_letters, replay_dead_letters

    with pytest.raises(ValueError, match="limit"):
        await list_dead_letters(broker, f"{name}.work", limit=limit)
    with pytest.raises(ValueError, match="limit"):
        await replay_dead_letters(broker, f"{name}.work", limit=limit)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("message_ttl", math.nan),  # before: "cannot convert float NaN to integer", at the declare
        ("message_ttl", math.inf),  # before: OverflowError, at the declare
        ("expires", 0),  # before: the broker's 406 "invalid arg 'x-expires'", which closed the topology channel
        ("expires", 0.0001),  # 0 ms once rounded: the same
        ("expires", math.nan),
        ("max_length", -1),  # before: the broker's 406 "invalid arg 'x-max-length'"
        ("max_length_bytes", -5),
    ],
)
def test_a_queue_argument_the_broker_refuses_is_a_value_error(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        Queue("q", **{field: value})  # type: ignore[arg-type]


def test_the_smallest_queue_arguments_the_broker_takes_are_kept() -> None:
    queue = Queue("q", message_ttl=0, expires=0.001, max_length=0, max_length_bytes=0)
    arguments = queue.declare_arguments()
    assert (arguments["x-message-ttl"], arguments["x-expires"]) == (0, 1)
    assert (arguments["x-max-length"], arguments["x-max-length-bytes"]) == (0, 0)


@pytest.mark.parametrize("spec", [Queue, Exchange], ids=["queue", "exchange"])
def test_a_name_amqp_cannot_carry_is_refused_where_the_spec_is_made(spec: type[Queue] | type[Exchange]) -> None:
    # Before: TypeError "object of type 'int' has no len()" and pamqp's ValueError "Max length exceeded for queue",
    # at the declare.
    with pytest.raises(TypeError, match="name must be text, not int"):
        spec(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="256 bytes in UTF-8; AMQP carries at most 255"):
        spec("é" * 128)
    assert spec("n" * 255).name == "n" * 255
