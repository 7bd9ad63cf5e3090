"""``executor="process"`` for RpcServer methods and Subscribers, as for Workers (issue 16).

A CPU-bound RPC method or event handler runs in a pool of processes, so the
server's event loop and heartbeats go on; the value goes in and the result
comes back; a failure is what it would be for an async handler (a
RemoteError for the caller; a nack to the dead-letter exchange for a
subscriber).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from amqpkit import Binding, Broker, Envelope, Exchange, Queue, RemoteError, RpcClient, RpcServer, Subscriber

from .. import long_task_handlers as handlers
from ..waiting import until_ready, wait_for


async def test_an_rpc_method_runs_in_the_pool_and_its_failures_reach_the_caller(broker: Broker, name: str) -> None:
    server = RpcServer(broker, f"{name}.rpc")
    server.add("square", handlers.square_here, executor="process", processes=2)
    server.add("check", handlers.refuse_negative, executor="process", processes=1)
    async with server, RpcClient(broker, f"{name}.rpc", timeout=30) as client:
        replies = [await client.call("square", n, returns=dict[str, int]) for n in range(6)]
        assert [r["square"] for r in replies] == [n * n for n in range(6)]
        assert os.getpid() not in {r["pid"] for r in replies}  # in the pool, not in the server's process
        assert await client.call("check", 3, returns=int) == 3
        with pytest.raises(RemoteError) as caught:
            await client.call("check", -1)
        assert caught.value.remote_type == "ValueError"
        assert "negative: -1" in caught.value.remote_message


def test_a_process_method_must_be_importable_by_name(broker: Broker, name: str) -> None:
    server = RpcServer(broker, f"{name}.rpc")
    with pytest.raises(TypeError, match="module-level function"):
        server.add("local", lambda x: x, executor="process")


async def test_a_subscriber_runs_in_the_pool_and_a_failure_is_dead_lettered(
    broker: Broker, name: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "events.log")
    exchange = Exchange(f"{name}.events", type="fanout", durable=False)
    dead = Queue(f"{name}.dead", durable=True)
    dlx = Exchange(f"{name}.dlx", type="fanout", durable=False)
    try:
        await broker.declare(dlx, dead, Binding(dlx, dead), exchange)
        sub: Subscriber[Any] = Subscriber(
            broker, exchange, handlers.note_event, queue=f"{name}.sub", dead_letter_exchange=dlx.name,
            executor="process", processes=2,
        )  # fmt: skip
        async with sub:
            for n in [1, 2, -1, 3]:
                body = json.dumps({"n": n, "log": log}).encode()
                await broker.publish(Envelope(body, content_type="application/json"), exchange=exchange.name)
            await wait_for(lambda: sub.handled == 3 and sub.failed == 1, 60)
        pids = {line.split("pid=")[1] for line in handlers.runs(log)}
        assert sorted(line.split()[1] for line in handlers.runs(log)) == ["1", "2", "3"]
        assert str(os.getpid()) not in pids
        await until_ready(broker, dead.name, 1)
    finally:
        for q in (dead.name, f"{name}.sub"):
            await broker.delete_queue(q)
        for x in (exchange.name, dlx.name):
            await broker.delete_exchange(x)
