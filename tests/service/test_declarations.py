"""A service's declarations are checked at startup, before anything reaches the broker; errors name the culprits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from amqpkit import Exchange, Queue, TaskContext
from amqpkit.service import Service, ServiceContext, ServiceError


class Order(BaseModel):
    id: int


class Pool:
    """Stands in for a database pool."""


def test_two_handlers_on_one_queue_with_different_specs_name_both() -> None:
    svc = Service("s")

    @svc.subscriber(Exchange("x", type="topic"), binding_keys=["a"], queue="shared")
    async def first(order: Order) -> None: ...

    @svc.worker("shared")
    async def second(order: Order) -> None: ...

    with pytest.raises(ServiceError) as info:
        svc.check()
    text = str(info.value)
    assert "first" in text and "second" in text and "'shared'" in text, text


def test_two_subscribers_on_one_shared_queue_are_refused() -> None:
    svc = Service("s")
    ex = Exchange("x", type="topic")

    @svc.subscriber(ex, binding_keys=["a"], queue="q")
    async def one(order: Order) -> None: ...

    @svc.subscriber(ex, binding_keys=["b"], queue="q")
    async def two(order: Order) -> None: ...

    with pytest.raises(ServiceError, match=r"one\b.*two\b.*both consume queue 'q'"):
        svc.check()


def test_rpc_methods_share_their_queue_but_not_a_name_or_a_spec() -> None:
    svc = Service("s")

    @svc.rpc("calc")
    async def add(n: int) -> int:
        return n + 1

    @svc.rpc("calc")
    async def sub(n: int) -> int:
        return n - 1

    svc.check()  # two methods on one request queue: one RpcServer

    @svc.rpc("calc", "add")
    async def add_again(n: int) -> int:
        return n

    with pytest.raises(ServiceError, match=r"add\b.*add_again.*method 'add'"):
        svc.check()

    other = Service("t")
    other.rpc("calc")(add)
    other.rpc(Queue("calc", durable=False))(sub)  # a name alone is a durable queue: this one differs
    with pytest.raises(ServiceError, match=r"declare the request queue 'calc' differently"):
        other.check()


def test_an_exchange_declared_twice_differently_names_both() -> None:
    svc = Service("s")
    svc.publisher(Exchange("events", type="fanout"), Order, name="announce")

    @svc.subscriber(Exchange("events", type="topic"), binding_keys=["#"])
    async def listen(order: Order) -> None: ...

    with pytest.raises(ServiceError) as info:
        svc.check()
    assert "announce" in str(info.value) and "listen" in str(info.value) and "'events'" in str(info.value)


def test_an_unresolvable_annotation_is_an_error_not_json() -> None:
    svc = Service("s")

    async def handler(order: NotDefinedAnywhere) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    svc.worker("q")(handler)
    with pytest.raises(ServiceError, match=r"handler.*annotation cannot be resolved.*NotDefinedAnywhere"):
        svc.check()


def test_a_parameter_nothing_fills_is_an_error() -> None:
    svc = Service("s")

    @svc.worker("q")
    async def handler(order: Order, pool: Pool) -> None: ...

    with pytest.raises(ServiceError, match=r"nothing fills parameter 'pool' \(Pool\)"):
        svc.check()

    @svc.resource
    async def pool() -> AsyncIterator[Pool]:
        yield Pool()

    svc.check()  # now the service provides a Pool


def test_task_context_is_for_workers_only() -> None:
    svc = Service("s")

    @svc.subscriber(Exchange("x", type="fanout"))
    async def listen(order: Order, task: TaskContext) -> None: ...

    with pytest.raises(ServiceError, match="only worker handlers get a TaskContext"):
        svc.check()


def test_resources_say_what_they_provide() -> None:
    svc = Service("s")

    @svc.resource
    async def untyped():  # type: ignore[no-untyped-def]
        yield object()

    with pytest.raises(ServiceError, match="untyped must say what it provides"):
        svc.check()

    twice = Service("t")

    @twice.resource
    def one() -> Pool:
        return Pool()

    @twice.resource
    async def two(ctx: ServiceContext) -> AsyncIterator[Pool]:
        yield Pool()

    with pytest.raises(ServiceError, match=r"one and .*two both provide Pool"):
        twice.check()


def test_a_process_handler_cannot_be_given_resources() -> None:
    svc = Service("s")
    with pytest.raises(ServiceError, match=r"runs in pool processes .*: it cannot be given ctx \(ServiceContext\)"):
        svc.worker("q", executor="process")(_crunch)  # refused when declared (more: test_service_executors.py)


def _crunch(order: Order, ctx: ServiceContext) -> Any:
    return order.id


def test_a_service_with_no_handlers_checks() -> None:
    Service("empty").check()
