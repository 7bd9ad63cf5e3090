"""A service's process worker holding a task past the broker's consumer_timeout: named once, completed once.

On a RabbitMQ node of the test's own, with ``consumer_timeout`` lowered to 5 s
and checked every second (on 3.10 it is a node-wide setting: never changed on
the shared node). The broker takes the task back after 5 s; the run goes on
in its pool process, and the copy the broker delivers again waits for it and
takes its outcome instead of starting a second run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from amqpkit import Broker, BrokerSettings, ReconnectPolicy, RetryPolicy
from amqpkit.service import Service

from .. import long_task_handlers as handlers
from ..brokerctl import SpareNode, consumer_timeout_node
from ..waiting import wait_for

CONSUMER_TIMEOUT_MS = 5000
FAST = RetryPolicy(max_attempts=3, initial_delay=0.2, multiplier=1, jitter=0)


@pytest.fixture(scope="module")
def timeout_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpareNode]:
    with consumer_timeout_node(tmp_path_factory.mktemp("service-consumer-timeout"), CONSUMER_TIMEOUT_MS) as node:
        yield node


@pytest.mark.timeout(240)
async def test_a_process_task_past_consumer_timeout_is_named_and_completes_once(
    timeout_node: SpareNode, name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqpkit")
    log = str(tmp_path / "runs.log")
    settings = BrokerSettings(
        url=timeout_node.url, heartbeat=2, connect_timeout=5, publish_timeout=15,
        reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=1.0, jitter=0.1),
    )  # fmt: skip
    svc = Service(f"{name}.svc")
    svc.worker(f"{name}.long", concurrency=1, executor="process", processes=1, retry=FAST)(handlers.sleep_then_done)
    async with Broker(settings) as broker:
        try:
            async with svc.serve(settings) as running:
                worker = running.workers[f"{handlers.__name__}:sleep_then_done"]
                work = running.context.work_queue(f"{name}.long")
                await work.enqueue({"n": 0, "seconds": 0, "log": log})  # the pool's process started (about 2 s)
                await wait_for(lambda: worker.completed == 1, timeout=60)
                # Held 6.5 s: the broker takes it back after 5-6 s; its copy waits up to 2.5 s for the run.
                task_id = await work.enqueue({"n": 1, "seconds": 6.5, "log": log})
                await wait_for(lambda: worker.completed == 2, timeout=60)
                assert worker._timeouts.timed_out == 1  # the broker did take it back
            assert [line.split(" pid=")[0] for line in handlers.runs(log)] == ["run 0", "run 1"]
            assert [line.split(" pid=")[0] for line in handlers.runs(log, "done")] == ["done 0", "done 1"]
            reports = [r.getMessage() for r in caplog.records if "past the broker's consumer_timeout" in r.getMessage()]
            assert len(reports) == 1 and task_id in reports[0] and "in its process" in reports[0], reports
            assert (worker.retried, worker.dead_lettered) == (0, 0)
            assert await broker.queue_counts(f"{name}.long") == (0, 0)
            assert (await broker.queue_counts(f"{name}.long.dlq"))[0] == 0
        finally:
            for q in (f"{name}.long", f"{name}.long.dlq"):
                await broker.delete_queue(q)
