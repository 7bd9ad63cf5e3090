"""An RPC request from another client whose reply_to is a direct reply-to name the broker cannot decode."""

from __future__ import annotations

import asyncio

import aiormq
import pytest
from pamqp.commands import Basic

from amqpkit import Broker, BrokerSettings, Queue, RpcClient, RpcServer
from amqpkit.patterns.rpc_wire import safe_reply_to

from ..waiting import wait_for


async def test_a_request_with_an_undecodable_direct_reply_to_does_not_cut_the_server_s_connection(
    broker: Broker, settings: BrokerSettings, amqp_url: str, name: str
) -> None:
    """Three requests written by another client with ``reply_to='amq.rabbitmq.reply-to.Zm9v.abc'`` (direct
    reply-to's prefix, then a name the broker cannot decode), while 8 good calls are being served (0.5 s each).
    RabbitMQ 3.10 answers a publish to that routing key by closing the whole connection (541 INTERNAL_ERROR,
    not a channel error), so each reply to such a request cut the server's connection: every consumer and
    publisher of its Broker, and every handler running, whose callers then wait out their timeout. Before: 3 of
    3 bad requests cut the connection (3-8 disconnects on 3.10, 4-12 on 4.0: a request delivered again was
    answered again), and the good calls in flight ran again. Now such a request is rejected unanswered."""
    server_broker = Broker(settings)
    await server_broker.connect()
    disconnects: list[BaseException] = []
    server_broker.on_disconnect(disconnects.append)
    server = RpcServer(server_broker, Queue(f"{name}.rpc"), concurrency=16)
    served_bad = good_runs = 0

    @server.method("echo")
    async def echo(n: int) -> int:
        nonlocal served_bad, good_runs
        if n == 7:
            served_bad += 1
        else:
            good_runs += 1
            await asyncio.sleep(0.5)
        return n

    try:
        async with server, RpcClient(broker, f"{name}.rpc", timeout=5) as client:
            assert await client.call("echo", 1, returns=int) == 1
            good_runs = 0
            failed: list[BaseException] = []
            raw = await aiormq.connect(amqp_url)
            try:
                ch = await raw.channel()
                for i in range(3):
                    calls = [asyncio.ensure_future(client.call("echo", 2, returns=int)) for _ in range(8)]
                    await asyncio.sleep(0.1)
                    await ch.basic_publish(
                        b"7", routing_key=f"{name}.rpc",
                        properties=Basic.Properties(
                            content_type="application/json", message_type="echo",
                            reply_to="amq.rabbitmq.reply-to.Zm9v.abc", correlation_id=f"bad{i}",
                        ),
                    )  # fmt: skip
                    results = await asyncio.gather(*calls, return_exceptions=True)
                    failed += [r for r in results if isinstance(r, BaseException)]
                await wait_for(lambda: server.rejected >= 3, 10)
            finally:
                await raw.close()
            assert not disconnects and not failed and good_runs == 24 and served_bad == 0, (
                f"3 bad requests: {len(disconnects)} disconnects of the server ({disconnects[:1]}), the bad ones "
                f"run {served_bad} times, {len(failed)} of 24 good calls failed ({failed[:1]}), the 24 good ones run "
                f"{good_runs} times"
            )
    finally:
        await server_broker.close()
        await broker.delete_queue(f"{name}.rpc")


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        # Direct reply-to names RabbitMQ gave (3.10.8, then 4.0.5), and queue names.
        ("amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABluAAAAClrDdyh.LytnJKdymjGXSH9gTpkeSQ==", True),
        ("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAzNTI5OTU0MAAAOQ0AAAAAaw3eGw==.CMIjOF1om48iu/MwiVvymA==", True),
        ("rpc.replies", True),
        ("amq.gen-JzTY20BRgKO-HjmUJj0wLg", True),
        # Ones a reply to would close the connection for, or that no reply can reach.
        ("amq.rabbitmq.reply-to.Zm9v.abc", False),  # base64, but not a pid
        ("amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABluAAAAClrDdy.LytnJKdymjGXSH9gTpkeSQ==", False),  # cut
        ("amq.rabbitmq.reply-to.@@@.abc", False),
        # Not two parts between dots: the broker takes them for no address and drops the reply (3.10.8, 4.0.5).
        ("amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABluAAAAClrDdyh", True),
        ("amq.rabbitmq.reply-to.x", True),
        ("amq.rabbitmq.reply-to.a.b.c", True),
        ("amq.rabbitmq.reply-to..abc", True),
        ("amq.rabbitmq.reply-to.", True),
    ],
)
def test_which_reply_to_names_are_answered(name: str, safe: bool) -> None:
    assert safe_reply_to(name) is safe
