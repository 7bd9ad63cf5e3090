"""`amqpkit worker` and `amqpkit check` say what went wrong: a lost queue ends the worker, a refused login is named.

The worker runs as a subprocess through the fault proxy, which stalls or cuts
only that worker's connection; its queue is replaced under it from this
test's own connection.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from amqpkit import Broker, Queue

from .reliability.proxy import FaultProxy, proxied_url
from .test_logs_events import CliProcess

pytestmark = pytest.mark.usefixtures("spawned")  # every process a test starts is ended, whatever the outcome
START_A_BROKER = "rabbitmq-server -detached"


@pytest.fixture
async def queue(broker: Broker, name: str) -> AsyncIterator[str]:
    try:
        yield name
    finally:
        await broker.delete_queue(name)
        await broker.delete_queue(f"{name}.dlq")


async def start_worker(proxy: FaultProxy, amqp_url: str, queue: str) -> CliProcess:
    worker = await CliProcess.start(
        "worker", "tests.worker_app:handle", "--queue", queue, env={"AMQP_URL": proxied_url(proxy, amqp_url)}
    )
    try:
        await worker.until(lambda line: line.startswith("worker on"), stderr=True)  # consuming now
    except BaseException:
        await worker.end(timeout=5)
        raise
    return worker


async def replace_queue(broker: Broker, queue: str) -> None:
    """Delete the worker's (quorum) queue and declare a classic one of the same name in its place."""
    await broker.delete_queue(queue)
    await broker.declare_queue(Queue(queue, durable=True))


async def test_worker_exits_non_zero_when_its_queue_is_replaced_under_it(
    proxy: FaultProxy, amqp_url: str, broker: Broker, queue: str
) -> None:
    """The broker cancels the consumer; declaring the queue again is refused (PRECONDITION_FAILED)."""
    worker = await start_worker(proxy, amqp_url, queue)
    try:
        proxy.stall()  # the worker hears of the deletion only once the other queue is in place
        await replace_queue(broker, queue)
        proxy.resume()
        code, err = await worker.wait_exit(timeout=30)
    finally:
        await worker.end(timeout=5)
    assert code == 1, err
    last = worker.err_lines[-1]
    assert last.startswith("error: "), err
    assert queue in last and "PRECONDITION_FAILED" in last, err


async def test_worker_exits_non_zero_when_its_queue_cannot_be_restored_after_a_cut(
    proxy: FaultProxy, amqp_url: str, broker: Broker, queue: str
) -> None:
    """The connection is cut while the queue is replaced; the reconnect cannot re-attach the worker."""
    worker = await start_worker(proxy, amqp_url, queue)
    try:
        proxy.stall()  # what the broker says about the deletion is dropped by the cut
        await replace_queue(broker, queue)
        proxy.cut()
        code, err = await worker.wait_exit(timeout=60)
    finally:
        await worker.end(timeout=5)
    assert code == 1, err
    last = worker.err_lines[-1]
    assert last.startswith("error: "), err
    assert queue in last and "PRECONDITION_FAILED" in last, err


def with_password(amqp_url: str, password: str) -> str:
    parts = urlsplit(amqp_url)
    netloc = f"{parts.username or 'guest'}:{password}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@pytest.mark.parametrize("command", [["check"], ["worker", "tests.worker_app:handle", "--queue", "unused"]])
async def test_a_refused_login_says_the_credentials_were_refused(amqp_url: str, command: list[str]) -> None:
    password = f"wrong-{uuid.uuid4().hex[:8]}"
    cli = await CliProcess.start(*command, env={"AMQP_URL": with_password(amqp_url, password)})
    code, err = await cli.wait_exit(timeout=60)
    out = "\n".join(cli.lines)
    assert code == 2, err
    last = cli.err_lines[-1]
    assert last.startswith("error: ") and "refused" in last, err
    assert "password" in last, err
    assert START_A_BROKER not in err
    assert password not in out + err


async def test_no_broker_still_says_start_one() -> None:
    cli = await CliProcess.start("check", env={"AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"})
    code, err = await cli.wait_exit(timeout=60)
    assert code == 2, err
    assert START_A_BROKER in cli.err_lines[-1], err
    assert "password" not in cli.err_lines[-1], err


async def test_a_queue_refused_at_start_is_one_error_line_and_exit_1(amqp_url: str, broker: Broker, queue: str) -> None:
    await broker.declare_queue(Queue(queue, durable=True))  # classic, where the worker declares a quorum queue
    cli = await CliProcess.start("worker", "tests.worker_app:handle", "--queue", queue, env={"AMQP_URL": amqp_url})
    code, err = await cli.wait_exit(timeout=60)
    assert code == 1, err
    assert cli.err_lines == [cli.err_lines[-1]], err  # no traceback
    assert cli.err_lines[-1].startswith("error: ") and "PRECONDITION_FAILED" in cli.err_lines[-1], err


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--executor", "proc"], "expected thread or process, not 'proc'"),
        (["--pool-size", "2"], "only with --executor process"),
        (["--executor", "process", "--pool-size", "0"], "must be at least 1"),
        (["--consumer-timeout", "0"], "seconds, more than 0, not 0"),
    ],
)
async def test_executor_flags_refuse_what_cannot_run(flags: list[str], said: str) -> None:
    # Checked before anything connects: no broker is needed, and nothing is consumed.
    cli = await CliProcess.start(
        "worker", "tests.worker_app:handle", "--queue", "never-consumed", *flags,
        env={"AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"},
    )  # fmt: skip
    code, err = await cli.wait_exit(timeout=60)
    assert code == 2, err
    assert said in " ".join(err.split()), err


async def test_a_handler_a_process_pool_cannot_take_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # A lambda has no importable name: a pool process could never be given it.
    (tmp_path / "lambda_handlers.py").write_text("handle = lambda job: job\n")
    cli = await CliProcess.start(
        "worker", "lambda_handlers:handle", "--queue", "never-consumed", "--executor", "process",
        env={"AMQP_URL": "amqp://guest:guest@127.0.0.1:1/", "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    code, err = await cli.wait_exit(timeout=60)
    assert code == 2, err
    assert "Traceback" not in err, err
    assert cli.err_lines[-1].startswith("error: "), err


async def test_consumer_timeout_reaches_the_queue_or_says_why_not(amqp_url: str, broker: Broker, queue: str) -> None:
    worker = await CliProcess.start(
        "worker", "tests.worker_app:handle", "--queue", queue, "--consumer-timeout", "60", env={"AMQP_URL": amqp_url}
    )
    try:
        started = await worker.until(lambda line: "started: worker on" in line)
    finally:
        code, err = await worker.end()
    assert code == 0, err
    if broker.server_version >= (3, 12):
        assert "(consumer_timeout 60 s)" in started, started
    else:  # the node's own setting holds; the worker says so rather than pretend
        assert "(consumer_timeout 60 s not applied" in started, started
