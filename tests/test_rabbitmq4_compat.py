"""RabbitMQ 4.x beside 3.x: no deprecated feature by amqpkit's own defaults, the server's version, a 4.x capability.

CI runs this file (with the rest of the suite) against the default 3.10 node and against a fresh 4.0
node that refuses deprecated features (``scripts/rabbitmq4.sh``, ``RABBITMQ4_DEPRECATED=deny``), so
each test here is checked on both; the ones that depend on the version say which branch they took.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from typing import Any

import pytest

from amqpkit import Broker, BrokerSettings, RpcClient, RpcServer, WorkQueue
from amqpkit.service import Service

from . import brokerctl
from .brokerctl import arabbitmqctl, vhost_args


async def _queue_info(amqp_url: str, queue: str) -> dict[str, str]:
    """The broker's own view of ``queue``: durable, exclusive, auto_delete, arguments (rabbitmqctl list_queues)."""
    columns = ["name", "durable", "exclusive", "auto_delete", "arguments"]
    out = await arabbitmqctl("list_queues", *vhost_args(amqp_url), "-q", "--no-table-headers", *columns)
    for line in out.splitlines():
        fields = line.split("\t")
        if fields[0] == queue:
            return dict(zip(columns, fields, strict=True))
    raise AssertionError(f"{queue} is not listed: {out!r}")


def _transient_non_exclusive(info: dict[str, str]) -> bool:
    return info["durable"] == "false" and info["exclusive"] == "false"


# ---------------------------------------------------------------- no deprecated feature by default


async def test_rpc_server_default_queue_is_durable(broker: Broker, amqp_url: str, name: str) -> None:
    """A queue given by name only is a durable classic queue (transient non-exclusive ones are deprecated on 4.x)."""
    server = RpcServer(broker, f"{name}.rpc")

    @server.method("echo")
    async def echo(x: int) -> int:
        return x

    async with server, RpcClient(broker, f"{name}.rpc") as client:
        assert await client.call("echo", 7, timeout=15) == 7
        info = await _queue_info(amqp_url, f"{name}.rpc")
    assert not _transient_non_exclusive(info), info
    assert info["durable"] == "true", info


async def test_service_rpc_queue_by_name_is_durable(
    amqp_url: str, name: str, service_runner: Any, broker: Broker
) -> None:
    svc = Service(name)

    @svc.rpc(f"{name}.calc")
    async def add(pair: list[int]) -> int:
        return pair[0] + pair[1]

    await service_runner(svc)
    async with RpcClient(broker, f"{name}.calc") as client:
        assert await client.call("add", [2, 40], timeout=15) == 42
    info = await _queue_info(amqp_url, f"{name}.calc")
    assert info["durable"] == "true", info


# ---------------------------------------------------------------- the server's version


async def test_server_version_is_read_from_the_connection(broker: Broker) -> None:
    await broker.connect()
    product, text = broker.server_product
    version = broker.server_version
    assert product == "RabbitMQ"
    assert version >= (3,), version
    assert text.startswith(".".join(map(str, version))), (text, version)
    print(f"broker: {product} {text} -> {version}")


def test_server_version_is_empty_before_connecting(settings: BrokerSettings) -> None:
    assert Broker(settings).server_version == ()


# ---------------------------------------------------------------- a 4.x capability, with its 3.x fallback


async def test_work_queue_consumer_timeout_per_queue_or_node_fallback(
    broker: Broker, amqp_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``WorkQueue(consumer_timeout=...)``: the queue's own timeout where the broker has it (3.12+), else a log line."""
    await broker.connect()
    work: WorkQueue[str] = WorkQueue(broker, name, consumer_timeout=2 * 3600)
    with caplog.at_level(logging.INFO, logger="amqpkit"):
        await work.declare()
    info = await _queue_info(amqp_url, name)
    if broker.server_version >= (3, 12):
        assert re.search(r"x-consumer-timeout.{0,10}7200000", info["arguments"]), info
        assert work.queue.arguments["x-consumer-timeout"] == 7200000
    else:
        assert "x-consumer-timeout" not in info["arguments"], info
        assert "x-consumer-timeout" not in work.queue.arguments
        assert any("consumer_timeout" in r.getMessage() and "3.12" in r.getMessage() for r in caplog.records), (
            caplog.text
        )
    await work.enqueue("x")  # the queue works either way
    assert (await broker.queue_counts(name))[0] == 1


def test_work_queue_consumer_timeout_must_be_positive(broker: Broker, name: str) -> None:
    with pytest.raises(ValueError, match="consumer_timeout"):
        WorkQueue(broker, name, consumer_timeout=0)


# ---------------------------------------------------------------- brokerctl drives the node under test


def test_lock_labels_of_long_command_lines_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two control commands that end alike still lock apart (a CI run once shared one lock for two nodes)."""
    tail = " /a/long/checkout/path/scripts/rabbitmq4.sh ctl" * 3
    monkeypatch.setenv(brokerctl.CTL_ENV, "env A=1" + tail)
    first = brokerctl.lock_label()
    monkeypatch.setenv(brokerctl.CTL_ENV, "env A=2" + tail)
    second = brokerctl.lock_label()
    assert first != second
    assert len(first) <= 100 and re.fullmatch(r"[A-Za-z0-9_.-]+", first), first


def test_brokerctl_runs_the_command_line_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """``AMQPKIT_RABBITMQCTL`` stands in for rabbitmqctl (how the 4.x node's control tool is reached)."""
    if not brokerctl.rabbitmqctl_available():
        pytest.fail("needs rabbitmqctl", pytrace=False)
    real = brokerctl.ctl_command()
    wrapper = f'{shlex.quote(sys.executable)} -c "import subprocess, sys; print(\'via-override\'); ' \
        f'sys.exit(subprocess.run(sys.argv[1:]).returncode)" {shlex.join(real)}'  # fmt: skip
    default_lock = brokerctl.lock_label()
    monkeypatch.setenv(brokerctl.CTL_ENV, wrapper)
    out = brokerctl.rabbitmqctl("list_vhosts", "-q", "name")
    assert out.splitlines()[0] == "via-override", out
    assert "/" in out.splitlines()[1:], out
    assert brokerctl.lock_label() != default_lock  # another node, another whole-broker lock
    assert brokerctl.rabbitmqctl_available()


def test_brokerctl_lock_follows_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(brokerctl.CTL_ENV, raising=False)
    monkeypatch.delenv(brokerctl.NODE_ENV, raising=False)
    plain = brokerctl.lock_label()
    monkeypatch.setenv(brokerctl.NODE_ENV, "other@localhost")
    by_node = brokerctl.lock_label()
    monkeypatch.setenv(brokerctl.CTL_ENV, "/opt/x/rabbitmq4.sh ctl")
    by_ctl = brokerctl.lock_label()
    assert len({plain, by_node, by_ctl}) == 3
    assert os.sep not in by_ctl


# ---------------------------------------------------------------- a deprecated feature the node denies


@pytest.mark.parametrize(
    ("spec", "feature", "instead"),
    [
        ({"durable": False}, "transient_nonexcl_queues", "durable"),
        ({"arguments": {"x-queue-master-locator": "min-masters"}}, "queue_master_locator", "x-queue-leader-locator"),
    ],
)
async def test_a_queue_the_node_denies_as_deprecated_is_a_topology_error(
    broker: Broker, name: str, spec: dict[str, Any], feature: str, instead: str
) -> None:
    """RabbitMQ 4.x configured to deny deprecated features answers the declare of a queue that uses one (a
    transient non-exclusive queue, the x-queue-master-locator argument) by closing the whole connection (541
    INTERNAL_ERROR). Before, declare_queue() and consume() raised ConnectionLost, which reads as a passing fault
    worth retrying: each retry cut every consumer and publish of the connection again. Now a TopologyError naming
    the feature and what to declare instead."""
    from amqpkit import Queue, TopologyError

    transient = Queue(f"{name}.deprecated", **spec)
    try:
        await broker.declare_queue(transient)
    except TopologyError as exc:
        refused = exc
    else:
        await broker.delete_queue(transient)
        pytest.skip(f"this node permits {feature} (3.x, or 4.x not denying deprecated features)")
    text = str(refused)
    assert feature in text and instead in text, text
    assert refused.kind == "queue" and refused.name == transient.name
    assert not broker.remembers(transient)

    async def ignore(_: object) -> None:
        return None

    with pytest.raises(TopologyError, match=feature):
        await broker.consume(transient, ignore)
    await broker.wait_connected(10)
    assert broker.consumers == ()
