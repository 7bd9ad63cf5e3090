"""scripts/rabbitmq4.sh: a RabbitMQ 4.x node beside the default one.

The test starts a node of its own (another instance name and free ports, sharing
the script's cached root, which it builds the first time), so it never touches the
default node nor the script's default 4.x node that others may be using.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions
import pytest

from amqpkit import Broker, BrokerSettings, Queue

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rabbitmq4.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass
class Node:
    instance: str
    amqp_port: int
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )


@pytest.fixture
def node() -> Iterator[Node]:
    """A 4.x node of this test's own, in "deny" mode (deprecated features refused); stopped and removed after."""
    if os.geteuid() != 0:
        pytest.fail("scripts/rabbitmq4.sh needs root (debootstrap, chroot, namespaces)", pytrace=False)
    instance = f"amqpkit-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ports = [_free_port() for _ in range(3)]
    env = {
        **os.environ,
        "RABBITMQ4_INSTANCE": instance,
        "RABBITMQ4_AMQP_PORT": str(ports[0]),
        "RABBITMQ4_DIST_PORT": str(ports[1]),
        "RABBITMQ4_EPMD_PORT": str(ports[2]),
        "RABBITMQ4_DEPRECATED": "deny",
    }
    n = Node(instance, ports[0], env)
    try:
        yield n
    finally:
        n.run("down", timeout=120)
        state = Path(env.get("RABBITMQ4_BASE", "/var/cache/amqpkit")) / "rabbitmq4-nodes" / instance
        shutil.rmtree(state, ignore_errors=True)


def _declare(url: str, queue: str, **kw: bool) -> None:
    """Declare ``queue`` over a fresh pika connection (the error, if any, is the broker's answer)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(queue, **kw)
    finally:
        if connection.is_open:
            connection.close()


@pytest.mark.timeout(900)  # the first run builds the cached root (debootstrap, a few minutes)
async def test_a_node_of_its_own_comes_up_is_driven_and_goes_away(node: Node, name: str) -> None:
    up = await asyncio.to_thread(node.run, "up", timeout=850)
    assert up.returncode == 0, up.stderr
    url = f"amqp://guest:guest@127.0.0.1:{node.amqp_port}/"

    # url and env agree, and env's control command is a command line that drives this node.
    assert node.run("url").stdout.strip() == url
    exported = dict(line.removeprefix("export ").split("=", 1) for line in node.run("env").stdout.splitlines() if line)
    assert shlex.split(exported["AMQP_URL"]) == [url]
    ctl = shlex.split(shlex.split(exported["AMQPKIT_RABBITMQCTL"])[0])
    plain = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ4_")}  # the command says which node
    status = subprocess.run([*ctl, "status"], env=plain, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert f"Node name: {node.instance}@localhost" in status.stdout
    assert "RabbitMQ version: 4." in status.stdout

    # The URL reaches that same node, a 4.x one: a queue declared through it is listed by its rabbitmqctl.
    async with Broker(BrokerSettings(url=url)) as broker:
        assert broker.server_product[0] == "RabbitMQ"
        assert broker.server_product[1].startswith("4.")
        await broker.declare_queue(Queue(name))
    listed = await asyncio.to_thread(node.run, "ctl", "list_queues", "-q", "--no-table-headers", "name")
    assert listed.returncode == 0, listed.stderr
    assert name in listed.stdout.split()

    # Deprecated features are refused in "deny" mode: a transient non-exclusive queue is,
    # a durable one and an exclusive one are not.
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker, match="transient_nonexcl_queues"):
        await asyncio.to_thread(_declare, url, f"{name}.transient", durable=False)
    await asyncio.to_thread(_declare, url, f"{name}.exclusive", durable=False, exclusive=True)

    # up is idempotent; status and logs report on the running node.
    again = node.run("up")
    assert again.returncode == 0 and "already running" in again.stderr
    assert node.run("status").stdout.startswith(f"running: {node.instance}@localhost")
    assert "Server startup complete" in node.run("logs").stdout

    down = await asyncio.to_thread(node.run, "down")
    assert down.returncode == 0, down.stderr
    stopped = node.run("status")
    assert (stopped.returncode, stopped.stdout.strip()) == (3, "stopped")
    assert not _answers(node.amqp_port)
    assert node.run("down").returncode == 0  # down is idempotent too
