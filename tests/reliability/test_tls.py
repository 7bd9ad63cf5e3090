"""TLS: a second RabbitMQ node with a TLS listener and a throwaway CA, started by the fixture.

amqpkit connects over amqps:// with the CA and verification on; with
another CA the connection is refused with a clear ConnectError.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amqpkit import Broker, BrokerSettings, ConnectError, Envelope, Queue, ReconnectPolicy, TlsSettings

NODE = "amqpkit-tls@localhost"
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
# The second node shares the first one's Erlang cookie, so rabbitmqctl can drive both.
NODE_HOME = "/var/lib/rabbitmq"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN=amqpkit {name}", cwd=directory)  # fmt: skip


def make_server_cert(directory: Path, ca: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=directory)  # fmt: skip
    (directory / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=directory)  # fmt: skip


def _ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RABBIT_BIN / "rabbitmqctl"), "-n", NODE, *args],
        env={**os.environ, "HOME": NODE_HOME}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A TLS-only-for-clients RabbitMQ node on free ports; yields (amqps port, certificate folder)."""
    for tool in ("openssl",):
        if shutil.which(tool) is None:
            pytest.fail(f"the TLS test needs {tool}", pytrace=False)
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        pytest.fail("the TLS test starts a second node with the local rabbitmq-server, which is not installed")
    d = tmp_path_factory.mktemp("tls")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_server_cert(d, "ca")
    tls_port, tcp_port, dist_port = _free_port(), _free_port(), _free_port()
    (d / "node.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{tcp_port}\n"
        f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
        f"ssl_options.cacertfile = {d}/ca.pem\n"
        f"ssl_options.certfile = {d}/server.pem\n"
        f"ssl_options.keyfile = {d}/server.key\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
    )
    (d / "enabled_plugins").write_text("[].\n")
    env = {
        **os.environ,
        "HOME": NODE_HOME,
        "RABBITMQ_NODENAME": NODE,
        "RABBITMQ_CONFIG_FILE": str(d / "node.conf"),
        "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
        "RABBITMQ_LOG_BASE": str(d / "log"),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(d / "node.pid"),
    }
    _ctl("stop", timeout=30)  # a node left over from an interrupted run
    subprocess.run([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], env=env, check=True, timeout=30)
    deadline = time.monotonic() + 90
    while _ctl("await_startup", "--timeout", "30").returncode != 0:
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-3000:] for p in (d / "log").glob("*.log"))
            pytest.fail(f"the TLS node did not start:\n{logs}", pytrace=False)
        time.sleep(1)
    try:
        yield tls_port, d
    finally:
        _ctl("stop", timeout=60)


def tls_settings(port: int, ca: Path, **kw: object) -> BrokerSettings:
    return BrokerSettings(
        url=f"amqps://guest:guest@localhost:{port}/",
        tls=TlsSettings(ca_file=str(ca)),
        connect_timeout=5,
        reconnect=ReconnectPolicy(initial_delay=0.05, connect_attempts=1),
        **kw,  # type: ignore[arg-type]
    )


async def test_amqps_with_the_ca_and_verification_on(tls_node: tuple[int, Path]) -> None:
    port, d = tls_node
    async with Broker(tls_settings(port, d / "ca.pem")) as broker:
        assert broker.server_product[0] == "RabbitMQ"
        queue = await broker.declare_queue(Queue(exclusive=True, durable=False, auto_delete=True))
        await broker.publish(Envelope(b"over tls"), routing_key=queue)
        got = await broker.get(queue)
        assert got is not None
        assert got.body == b"over tls"
        await got.ack()


async def test_another_ca_is_refused_clearly(tls_node: tuple[int, Path]) -> None:
    port, d = tls_node
    started = time.monotonic()
    with pytest.raises(ConnectError) as info:
        async with Broker(tls_settings(port, d / "other-ca.pem")):
            pass
    text = str(info.value)
    assert f"localhost:{port}" in text
    assert "CERTIFICATE_VERIFY_FAILED" in text
    assert "guest:guest" not in text
    assert time.monotonic() - started < 5


async def test_verification_is_on_by_default(tls_node: tuple[int, Path]) -> None:
    """No CA given: the system's trust store does not know the throwaway CA, so the connection is refused."""
    port, _ = tls_node
    settings = BrokerSettings(
        url=f"amqps://guest:guest@localhost:{port}/", reconnect=ReconnectPolicy(connect_attempts=1)
    )
    with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await Broker(settings).connect()
