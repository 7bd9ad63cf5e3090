"""A retry whose delay runs out while the broker is down, and the broker's restart.

Soak finding (RELIABILITY.md, "A retry held back by the broker after a restart"): a retry sitting in
its quorum delay queue when the node stopped, and due while it was down, stayed in that queue after the
restart, the node logging "Cannot forward any dead-letter messages from source quorum queue ...
dead-letter-exchange ... does not exist". The cause is on the broker's side (rabbitmq-server #12625,
see patterns/work-queue.md, "Retries across a broker restart"): when a node starts, it brings its
queues back before its exchanges, and a quorum queue's dead-letter worker that finds no exchange
keeps what it holds until its publisher-confirm timeout (``dead_letter_worker_publisher_confirm_timeout``,
180 s by default) runs out. The more queues the node has to bring back, the wider that window: each
test here gives its own node a few hundred quorum queues, then stops and starts it with a retry due.

- On a node as installed, the retry often does not come back within 30 s: xfail, not strict, as the
  node wins the race now and then (it stuck in 3 of 5 runs measured with 300 other quorum queues).
  Marked slow: `pytest -m slow tests/patterns/test_retry_restart.py` runs it.
- On a node whose confirm timeout is short (advanced.config, as patterns/work-queue.md advises), it does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from amqpkit import Broker, BrokerSettings, Queue, QueueType, ReconnectPolicy, RetryPolicy, Worker, WorkQueue

from ..brokerctl import SpareNode
from ..waiting import until, wait_for

DELAY = 14.0  # seconds: longer than stop_app takes on a loaded machine, so the retry is still queued when it stops
BACK_WITHIN = 30.0  # seconds after the node is up again
OTHER_QUEUES = 300  # quorum queues the node brings back before its exchanges: they widen the window
CONFIRM_TIMEOUT_MS = 5000  # the mitigation: the dead-letter worker retries every 5 s instead of 180 s


@pytest.fixture
def own_node(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SpareNode]:
    """A RabbitMQ node of this test's own (with ``request.param`` as advanced.config), always stopped afterwards."""
    advanced: str = getattr(request, "param", "")
    if advanced:
        (tmp_path / "advanced.config").write_text(advanced)
        monkeypatch.setenv("RABBITMQ_ADVANCED_CONFIG_FILE", str(tmp_path / "advanced.config"))
    node = SpareNode(tmp_path)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def ctl(node: SpareNode, *args: str) -> None:
    result = node.ctl(*args, timeout=120)
    if result.returncode != 0:  # pytest.fail, not an AssertionError: not the failure the xfail case expects
        pytest.fail(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip()}", pytrace=False)


AS_INSTALLED = pytest.param(
    "",
    id="as-installed",
    # Kept out of the default run (-m slow runs it): it documents the broker's race and can only xfail or
    # xpass, at about 80 s a run; the case below is the one that proves amqpkit's advice works.
    marks=(
        pytest.mark.slow,
        pytest.mark.xfail(
            # Not strict: it is a race on the node's side, lost in 3 of the 5 runs measured with 300 other queues.
            strict=False,
            raises=AssertionError,
            reason="rabbitmq-server #12625: at start-up a quorum queue's dead-letter worker may find no exchange yet "
            "and holds its messages for dead_letter_worker_publisher_confirm_timeout (180 s)",
        ),
    ),
)
SHORT_CONFIRM_TIMEOUT = pytest.param(
    f"[{{rabbit, [{{dead_letter_worker_publisher_confirm_timeout, {CONFIRM_TIMEOUT_MS}}}]}}].\n",
    id="short-confirm-timeout",
)


@pytest.mark.whole_broker
@pytest.mark.timeout(400)
@pytest.mark.parametrize("own_node", [AS_INSTALLED, SHORT_CONFIRM_TIMEOUT], indirect=True)
async def test_a_retry_due_while_the_node_is_down_comes_back_after_it_restarts(own_node: SpareNode, name: str) -> None:
    attempts: list[float] = []  # the first task's
    later: dict[int, int] = {}  # attempts of the tasks sent after the restart

    async def handler(value: Any) -> None:
        if value["n"] > 1:
            later[value["n"]] = later.get(value["n"], 0) + 1
            if later[value["n"]] == 1:
                raise RuntimeError("fails once")
            return
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise RuntimeError("fails once")

    settings = BrokerSettings(
        url=own_node.url, heartbeat=5, reconnect=ReconnectPolicy(initial_delay=0.05, max_delay=1.0, jitter=0.1)
    )
    async with Broker(settings) as broker:
        for i in range(OTHER_QUEUES):
            await broker.declare_queue(Queue(f"{name}.other.{i}", type=QueueType.QUORUM))
        tasks: WorkQueue[Any] = WorkQueue(
            broker, name, retry=RetryPolicy(max_attempts=3, initial_delay=DELAY, jitter=0)
        )
        async with Worker(tasks, handler, concurrency=2) as worker:
            await tasks.enqueue({"n": 1}, task_id=f"{name}-task")
            delay_queue, _ = await tasks.delay_queue(DELAY)

            async def held() -> bool:
                return (await broker.queue_counts(delay_queue))[0] == 1

            try:  # the retry is in its delay queue (a failure here is not the one the xfail case expects)
                await wait_for(lambda: worker.retried == 1, 30)
                await until(held, 10)
            except AssertionError as exc:
                pytest.fail(f"the retry never reached its delay queue: {exc}", pytrace=False)
            sent = time.monotonic()
            await asyncio.to_thread(ctl, own_node, "stop_app")
            if len(attempts) != 1:
                pytest.fail("the retry ran before the node went down: the test proves nothing", pytrace=False)
            await asyncio.sleep(max(0.0, sent + DELAY + 2 - time.monotonic()))  # the fault: down past the delay
            await asyncio.to_thread(ctl, own_node, "start_app")
            await asyncio.to_thread(ctl, own_node, "await_startup")
            up = time.monotonic()
            # AssertionError when it does not come back in time: the only failure the xfail case expects.
            await wait_for(lambda: len(attempts) == 2, BACK_WITHIN)
            print(f"retry back {attempts[1] - up:+.1f} s from the node's restart")
            # The delay queue's dead-letter worker held that retry back; retries sent through it afterwards
            # come back too (a soak once ended with a retry held in a delay queue that had worked since).
            for n in range(2, 6):
                await tasks.enqueue({"n": n}, task_id=f"{name}-task-{n}")
            try:
                await wait_for(lambda: all(later.get(n) == 2 for n in range(2, 6)), DELAY + BACK_WITHIN)
            except AssertionError as exc:  # not the failure the xfail case expects
                pytest.fail(f"retries sent after the restart did not all come back: {later}: {exc}", pytrace=False)


HELD_CONFIRM_TIMEOUT_MS = 20_000  # the broker tries a held retry again after this: longer than the delay queue lives


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "own_node",
    [f"[{{rabbit, [{{dead_letter_worker_publisher_confirm_timeout, {HELD_CONFIRM_TIMEOUT_MS}}}]}}].\n"],
    ids=["confirm-timeout-20s"],
    indirect=True,
)
async def test_a_retry_held_behind_a_full_work_queue_outlives_the_worker_that_sent_it(
    own_node: SpareNode, name: str
) -> None:
    """A retry whose delay ran out while its work queue was full (a length limit: amqpkit's work queue refuses
    what does not fit) is held in its delay queue until the broker tries again. The worker that sent it
    stopped, and another worker process took over: before, that one renewed only delay queues it sent to
    itself, so the delay queue expired with the retry in it (a hunt with an operator's max-length policy: lost,
    nothing said). A worker now renews, from its start, the delay queues its retry policy can use that exist."""
    settings = BrokerSettings(url=own_node.url, heartbeat=5, reconnect=ReconnectPolicy(initial_delay=0.05))
    policy = RetryPolicy(max_attempts=3, initial_delay=2.0, jitter=0)
    ctl(own_node, "set_policy", f"{name}-full", f"^{name}$", '{"max-length": 1}', "--apply-to", "queues")
    done: list[str] = []

    async def fails_first(value: Any) -> None:
        if value["n"] == 1 and "failed-1" not in done:
            done.append("failed-1")
            raise RuntimeError("fails once")
        done.append(f"done-{value['n']}")

    async with Broker(settings) as broker:
        sender: WorkQueue[Any] = WorkQueue(broker, name, retry=policy)
        sender.delay_queue_min_expiry = 3.0  # its delay queue lives 6 s unused (three times the 2 s delay)
        async with Worker(sender, fails_first, concurrency=1) as first:
            await sender.enqueue({"n": 1}, task_id=f"{name}-1")
            await wait_for(lambda: first.retried == 1, 10)
        held_from = time.monotonic()
        # The work queue full when the retry is due: a quorum queue refuses once it is over its limit
        for n in (2, 3):
            await sender.enqueue({"n": n}, task_id=f"{name}-{n}")
        delay_queue = f"{name}.retry.2000"

        await asyncio.sleep(max(0.0, held_from + 3 - time.monotonic()))
        # due a second ago, refused by the full work queue: held in its delay queue, which is still there
        assert (await broker.queue_counts(name))[0] == 2
        await broker.queue_counts(delay_queue)
        taker: WorkQueue[Any] = WorkQueue(broker, name, retry=policy)  # another worker process's
        taker.delay_queue_min_expiry = 3.0
        async with Worker(taker, fails_first, concurrency=1):
            # the broker tries the held retry again 20 s after it was refused; before, its delay queue had
            # expired by then (6 s unused, and the broker's check every few seconds)
            await wait_for(lambda: "done-1" in done, HELD_CONFIRM_TIMEOUT_MS / 1000 + 15)
        assert done.count("done-1") == 1 and "done-2" in done and "done-3" in done, done
