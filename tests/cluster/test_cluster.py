"""amqpkit against the three-node cluster of scripts/cluster.sh: failover, leader moves, RPC, partitions.

Short loads (a few hundred to 1,500 messages) for CI; scripts/cluster_faults.py runs the full ones.
Every test leaves the cluster as it found it: all three nodes running, no cut (``restore``).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from amqpkit import AmqpkitError, Broker, BrokerSettings, Envelope, ReconnectPolicy

from ..brokerctl import free_port
from . import load as L

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
async def _restored() -> AsyncIterator[None]:
    await L.restore()
    try:
        yield
    finally:
        await L.restore()


def _name(what: str) -> str:
    return f"cluster-{what}-{uuid.uuid4().hex[:8]}"


async def _wait_for_count(load: L.Load, count: int, timeout: float = 120) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while len(load.ledger.confirmed) < count:
        assert loop.time() < end, f"{count} confirms not reached within {timeout} s"
        await asyncio.sleep(0.05)


async def _leader(queue: str, via: int) -> int:
    out = await L.acluster("ctl", str(via), "list_queues", "-q", "--no-table-headers", "name", "leader")
    for line in out.splitlines():
        name, _, leader = line.partition("\t")
        if name == queue and (m := re.search(r"amqpkit-c(\d)", leader)):
            return int(m.group(1))
    raise AssertionError(f"no leader found for {queue}: {out!r}")


async def test_connecting_goes_through_the_url_list() -> None:
    """A dead first URL is passed over; the Broker lands on node 1, the next in the list."""
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    settings = BrokerSettings(urls=(dead, *L.urls()), connect_timeout=5, reconnect=ReconnectPolicy(connect_attempts=1))
    async with Broker(settings) as broker:
        assert broker.is_connected
        assert L.connected_node(broker) == 1


async def test_node_death_moves_connection_consumer_and_unconfirmed_publishes() -> None:
    """Kill -9 the connected node mid-load: the Broker moves on, the consumer comes back, nothing confirmed is lost.

    The load never retries a publish itself here: every publish() returned (publish_errors is
    empty), so the ones waiting for a confirm when the node died were sent again by the Broker,
    with their own message ids (the ledger matches ids).
    """
    queue = L.quorum(_name("kill"))
    broker = Broker(L.settings(1))
    await broker.connect()
    try:
        await broker.declare_queue(queue)
        await L.wait_replicated(queue.name)
        load = L.Load(broker, queue, 1500, workers=32, rate=150)
        await load.start_consumer()
        publishing = asyncio.create_task(load.publish_all())
        await _wait_for_count(load, 400)
        victim = L.connected_node(broker)
        killed_at = time.monotonic()
        await L.acluster("kill", str(victim))
        await publishing
        assert await load.drain(120), f"not every confirmed message arrived: {load.ledger.summary()}"
        summary = load.ledger.summary()
        print("failover:", summary["reconnect_seconds"], "longest confirm gap:", load.ledger.longest_gap(killed_at))
        assert summary["lost"] == 0
        assert summary["confirmed"] == 1500
        assert summary["publish_errors"] == {}
        assert len(summary["reconnect_seconds"]) >= 1
        assert max(summary["reconnect_seconds"]) < 30
        assert L.connected_node(broker) != victim
        await load.stop()
    finally:
        await broker.delete_queue(queue)
        await broker.close(grace=1)


async def test_quorum_leader_move_is_only_a_pause() -> None:
    """The quorum queue's leader node dies while the client is on another node: no disconnect, no error, no loss."""
    queue = L.quorum(_name("leader"))
    async with Broker(L.settings(1)) as setup:
        await setup.declare_queue(queue)
    await L.wait_replicated(queue.name)
    leader = await _leader(queue.name, 1)
    other = 1 if leader != 1 else 2
    broker = Broker(L.settings(other, reconnect=ReconnectPolicy(connect_attempts=1)))
    await broker.connect()
    try:
        # Only the node we are on may be in the list: a reconnect would fail the test.
        load = L.Load(broker, queue, 800, workers=16, rate=100)
        await load.start_consumer()
        publishing = asyncio.create_task(load.publish_all())
        await _wait_for_count(load, 200)
        killed_at = time.monotonic()
        await L.acluster("kill", str(leader))
        await publishing
        assert await load.drain(120), f"not every confirmed message arrived: {load.ledger.summary()}"
        summary = load.ledger.summary()
        pause = load.ledger.longest_gap(killed_at)
        print(f"leader on node {leader} killed; client on node {other}; longest confirm gap {pause:.2f} s")
        assert summary["disconnects"] == 0
        assert summary["publish_errors"] == {}
        assert summary["lost"] == 0
        assert pause < 60
        # Not asked here: which node leads now. Right after a kill, list_queues may time out
        # ("some queues are unresponsive") while the cluster settles; the load above is the check.
        await load.stop()
    finally:
        await broker.delete_queue(queue)
        await broker.close(grace=1)


async def test_one_call_at_a_time_is_not_held_back_by_the_client_relay() -> None:
    """Sequential calls, client on node 1, server on node 2: no call waits ~40 ms for a delayed ACK.

    The host-to-namespace relay once forwarded without TCP_NODELAY; small writes then sat behind
    Nagle's algorithm until the peer's delayed ACK, which put a steady ~44 ms p90 on every RPC
    figure the cluster gave. A call here takes a few milliseconds, so a p90 of 25 ms says it again.
    """
    from amqpkit import RpcClient, RpcServer

    async def add(numbers: dict[str, int]) -> int:
        return numbers["a"] + numbers["b"]

    queue = _name("nodelay")
    async with Broker(L.settings(1)) as client_broker, Broker(L.settings(2)) as server_broker:
        server = RpcServer(server_broker, queue)
        server.add("add", add)
        async with server:
            client = RpcClient(client_broker, queue, timeout=5)
            for n in range(20):  # warm up
                assert await client.call("add", {"a": n, "b": 1}, returns=int) == n + 1
            took: list[float] = []
            for n in range(200):
                started = time.perf_counter()
                assert await client.call("add", {"a": n, "b": 1}, returns=int) == n + 1
                took.append(time.perf_counter() - started)
            await client.close()
        await server_broker.delete_queue(queue)
    took.sort()
    p50, p90 = took[len(took) // 2], took[int(len(took) * 0.9)]
    print(f"sequential calls across nodes: p50 {p50 * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms")
    assert p90 < 0.025, f"p90 {p90 * 1000:.1f} ms (p50 {p50 * 1000:.1f} ms)"


async def test_rpc_calls_in_flight_end_when_the_node_dies() -> None:
    """RPC at 50 calls/s; the client's node is killed: every call ends, with the right result or a typed error."""
    client = Broker(L.settings(1))
    server = Broker(L.settings(2))
    await client.connect()
    await server.connect()
    try:
        rpc = L.RpcLoad(client, server, _name("rpc"), rate=50, timeout=5)
        async with rpc:
            calling = asyncio.create_task(rpc.run())
            loop = asyncio.get_running_loop()
            end = loop.time() + 60
            while rpc.ledger.ok < 50:
                assert loop.time() < end, f"no RPC traffic: {rpc.ledger.summary()}"
                await asyncio.sleep(0.05)
            await L.acluster("kill", str(L.connected_node(client)))
            ok_at_kill = rpc.ledger.ok
            while rpc.ledger.ok < ok_at_kill + 100:  # calls succeed again after the failover
                assert loop.time() < end + 60, f"RPC did not recover: {rpc.ledger.summary()}"
                await asyncio.sleep(0.05)
            await rpc.finish()
            await calling
        summary = rpc.ledger.summary()
        print("rpc:", summary)
        assert summary["hung"] == 0
        assert summary["wrong_results"] == 0
        assert summary["untyped_errors"] == []
        assert summary["ok"] + sum(summary["errors"].values()) == summary["calls"]
    finally:
        await client.close(grace=1)
        await server.close(grace=1)


async def test_publishes_to_a_cut_off_node_never_report_success() -> None:
    """Node 3 cut off: publishes through it (its URL alone) fail typed or time out; none is confirmed."""
    queue = L.quorum(_name("minority"))
    async with Broker(L.settings(1)) as setup:
        await setup.declare_queue(queue)
        await L.wait_replicated(queue.name)
        policy = ReconnectPolicy(initial_delay=0.2, max_delay=1, connect_attempts=1000)
        minority = Broker(BrokerSettings(url=L.urls()[2], connect_timeout=3, publish_timeout=5, reconnect=policy))
        await minority.connect()
        outcomes: dict[str, int] = {}
        try:
            await L.acluster("partition", "3")
            loop = asyncio.get_running_loop()
            end = loop.time() + 20
            n = 0
            while loop.time() < end:
                n += 1
                try:
                    await minority.publish(Envelope(b"minority", message_id=f"min-{n}"), routing_key=queue.name)
                    outcomes["confirmed"] = outcomes.get("confirmed", 0) + 1
                except AmqpkitError as exc:
                    outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
            await L.acluster("heal")
        finally:
            await minority.close(grace=1)
            await L.acluster("heal")
        print("publishes through the cut-off node:", outcomes)
        assert sum(outcomes.values()) >= 2
        assert "confirmed" not in outcomes
        await L.acluster("ctl", "3", "await_startup", "--timeout", "120", timeout=180)
        await setup.delete_queue(queue)
