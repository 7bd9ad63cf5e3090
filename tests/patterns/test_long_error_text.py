"""A handler's exception whose text is huge (it carries the input it refused: a 2 MB product id) is logged, and put
in a task's events, cut to ERROR_TEXT_SHOWN characters: the RPC server's WARNING was one 2 MB line (a hunt)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from amqpkit import (
    Broker,
    Delivery,
    Envelope,
    Exchange,
    Queue,
    RetryPolicy,
    RpcClient,
    RpcServer,
    Subscriber,
    Worker,
    WorkQueue,
)
from amqpkit.errors import RemoteError

from ..waiting import wait_for

HUGE = "p" * 200_000
LONGEST = 2_000  # characters of a log line, as for a bad message's (test_bad_input)


def longest_line(caplog: pytest.LogCaptureFixture) -> int:
    return max((len(r.getMessage()) for r in caplog.records if r.name.startswith("amqpkit")), default=0)


async def test_an_rpc_method_s_huge_error_is_logged_cut(
    broker: Broker, name: str, cleanup: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    cleanup.append(f"q:{name}.rpc")
    server = RpcServer(broker, Queue(f"{name}.rpc"))

    @server.method("look")
    async def look(product_id: str) -> None:
        raise ValueError(f"no product {product_id}")

    caplog.set_level(logging.WARNING)
    async with server, RpcClient(broker, f"{name}.rpc") as client:
        with pytest.raises(RemoteError) as failed:
            await client.call("look", HUGE, timeout=10)
    assert HUGE in failed.value.remote_message  # the caller still gets the whole error
    assert any("method look failed" in r.getMessage() for r in caplog.records)
    assert longest_line(caplog) < LONGEST, longest_line(caplog)


async def test_a_task_s_and_a_subscriber_s_huge_errors_are_logged_cut(
    broker: Broker, name: str, cleanup: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    work = WorkQueue(broker, f"{name}.tasks", retry=RetryPolicy(max_attempts=2, initial_delay=0.1, jitter=0))
    cleanup += [f"q:{work.name}", f"q:{work.dlq_name}"]

    async def task(job: Delivery[Any]) -> None:
        raise ValueError(f"no product {HUGE}")

    worker = Worker(work, task, concurrency=1)
    events = Exchange(f"{name}.events", type="fanout")
    cleanup += [f"x:{events.name}", f"q:{name}.sub"]

    async def on_event(event: Any) -> None:
        raise ValueError(f"no product {HUGE}")

    async with worker, Subscriber(broker, events, on_event, queue=f"{name}.sub") as sub:
        await work.enqueue({"n": 1})
        await broker.publish(Envelope(b'{"n": 1}', content_type="application/json"), exchange=events.name)
        await wait_for(lambda: worker.dead_lettered == 1 and sub.failed == 1, 15)
    said = [r.getMessage() for r in caplog.records]
    assert any("retry in" in m for m in said) and any("dead-lettered" in m for m in said), said
    assert any("handler failed" in m for m in said), said
    assert longest_line(caplog) < LONGEST, longest_line(caplog)
