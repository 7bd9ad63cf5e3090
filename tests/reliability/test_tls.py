"""TLS: a RabbitMQ node of its own with a TLS listener and a throwaway CA, started by the fixture.

amqpkit connects over amqps:// with the CA and verification on; with
another CA the connection is refused with a clear ConnectError.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amqpkit import Broker, BrokerSettings, ConnectError, Envelope, Queue, ReconnectPolicy, TlsSettings

from ..brokerctl import SpareNode, free_port


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


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A node of its own with a TLS listener, on free ports; yields (amqps port, certificate folder)."""
    if shutil.which("openssl") is None:
        pytest.fail("the TLS test needs openssl", pytrace=False)
    d = tmp_path_factory.mktemp("tls")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_server_cert(d, "ca")
    tls_port = free_port()
    node = SpareNode(
        d,
        f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
        f"ssl_options.cacertfile = {d}/ca.pem\n"
        f"ssl_options.certfile = {d}/server.pem\n"
        f"ssl_options.keyfile = {d}/server.key\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n",
    )
    node.start()
    try:
        yield tls_port, d
    finally:
        node.stop()


def tls_settings(port: int, ca: Path, **kw: object) -> BrokerSettings:
    return BrokerSettings(
        url=f"amqps://guest:guest@localhost:{port}/",
        tls=TlsSettings(ca_file=str(ca)),
        connect_timeout=5,
        reconnect=ReconnectPolicy(initial_delay=0.05, connect_attempts=1),
        **kw,
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
