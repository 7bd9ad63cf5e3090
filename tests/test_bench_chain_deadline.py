"""The chain scenarios pass the caller's deadline down: no service works on a request nobody waits for.

Each service of the chain here spends 300 ms on its own work and A gives up
after 500 ms. B's work leaves 200 ms for C, whose 300 ms cannot fit: C ends
its part when the time is gone and D never hears of the request. Without
the deadline passed on, C and D would each work their full 300 ms (D done
at 0.9 s, long after A gave up). The counts are the services' own:
``received`` (a step done and passed on) and ``expired`` (a step ended or
skipped at the caller's deadline). Nothing here checks that anything is fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from amqpkit.bench.base import ClientOptions, ClientSide, ServerOptions
from amqpkit.bench.chain import ROLES, ChainEventsClient, Hop
from amqpkit.bench.clients import RawRpcClient
from amqpkit.bench.scenarios import CLIENTS, SERVERS

from .waiting import hold_the_loop

CHAINS = ("chain-rpc", "chain-events", "chain-http")
REQUESTS = 4


class Chain:
    def __init__(self, services: dict[str, Hop], client: ClientSide) -> None:
        self.services = services
        self.client = client

    async def send(self) -> list[BaseException | None]:
        """REQUESTS requests at once from A; each one's outcome (None: completed)."""
        outcomes = await asyncio.gather(
            *(self.client.operate(time.monotonic_ns(), False) for _ in range(REQUESTS)), return_exceptions=True
        )
        return [o if isinstance(o, BaseException) else None for o in outcomes]


@contextlib.asynccontextmanager
async def chain(scenario: str, url: str, base: str, *, service_ms: float, deadline: float) -> AsyncIterator[Chain]:
    """B, C and D in this event loop (D first, so that each one's next is up), and A driving them."""
    services: dict[str, Hop] = {}
    client: ClientSide | None = None
    try:
        following = ""
        for role in ROLES:
            options = ServerOptions(
                url=url, queue=base, prefetch=8, service_ms=service_ms, role=role, next_endpoint=following,
                deadline=deadline,
            )  # fmt: skip
            service = SERVERS[scenario](options)
            assert isinstance(service, Hop)
            services[role] = service
            await service.start()
            following = service.endpoint
        client = CLIENTS[scenario](ClientOptions(url=url, queue=base, size=128, endpoint=following, deadline=deadline))
        await client.start()
        yield Chain(services, client)
    finally:
        if client is not None:
            await client.stop()
        for service in reversed(list(services.values())):
            await service.stop()


@pytest.mark.parametrize("scenario", CHAINS)
async def test_no_service_works_past_the_callers_deadline(scenario: str, amqp_url: str, name: str) -> None:
    async with chain(scenario, amqp_url, name, service_ms=300, deadline=0.5) as c:
        outcomes = await c.send()
        assert all(isinstance(o, TimeoutError) for o in outcomes), outcomes
        await asyncio.sleep(1.5)  # D would have been done at 0.9 s had the requests gone on
        b, c_, d = (c.services[role] for role in ("b", "c", "d"))
        assert d.received == 0, "D worked on requests nobody waited for"
        assert c_.received == 0, "C passed on requests with no time left"
        assert d.expired == 0  # D never heard of them
        # C ran out (B's own call or wait may end at the same moment, and counts it too).
        assert c_.expired == REQUESTS, (b.expired, c_.expired)
        if not isinstance(c.client, ChainEventsClient):
            assert b.received == 0  # B answers A only with the whole chain's answer
        if isinstance(c.client, ChainEventsClient):
            assert c.client.expired == REQUESTS  # A is told, once per request
            assert b.received == REQUESTS  # B's own step fitted, and went on with the time left
            assert b.expired == 0  # each request expires in one step only
            assert c.client.late == 0


@pytest.mark.parametrize("scenario", CHAINS)
async def test_a_chain_with_time_enough_completes(scenario: str, amqp_url: str, name: str) -> None:
    """The deadline passed on is the time left, not less: 10 ms per step within 5 s all complete."""
    async with chain(scenario, amqp_url, name, service_ms=10, deadline=5.0) as c:
        outcomes = await c.send()
        assert outcomes == [None] * REQUESTS
        for role in ("b", "c", "d"):
            assert c.services[role].received == REQUESTS
            assert c.services[role].expired == 0
        if isinstance(c.client, ChainEventsClient):
            assert c.client.expired == 0


@pytest.mark.parametrize("scenario", ["chain-events", "raw-rpc"])
async def test_an_answer_heard_as_the_deadline_fires_counts_as_heard(scenario: str, amqp_url: str, name: str) -> None:
    """A's answer set in the same loop turn as its timeout's callback is still counted: completed, not lost.

    The loop is held past the deadline, so that two timers fall due together: the one that hands A its answer
    (as the subscriber's callback would) and then the deadline's own. A then wakes up cancelled with its answer
    in hand; dropping that answer left the request in no count at all (the burst ledger's ``lost``).
    """
    deadline = 0.5
    client = CLIENTS[scenario](ClientOptions(url=amqp_url, queue=name, size=16, deadline=deadline))
    assert isinstance(client, ChainEventsClient | RawRpcClient)
    await client.start()
    try:
        loop = asyncio.get_running_loop()
        operating = asyncio.ensure_future(client.operate(time.monotonic_ns(), False))
        await asyncio.sleep(0)
        (future,) = client.pending.values()
        waiting = hold_the_loop(deadline / 2, deadline, operating, future)  # both timers below are due after it
        answer: Any = None if isinstance(client, ChainEventsClient) else b"reply"
        loop.call_later(deadline * 0.9, future.set_result, answer)  # before the deadline's own timer in the heap
        await asyncio.wait_for(operating, 5)  # raised TimeoutError before: the answer was dropped
        assert waiting == [True]  # A was waiting for its answer when the loop was held
        if isinstance(client, ChainEventsClient):
            assert client.late == 0 and client.expired == 0
    finally:
        await client.stop()


async def test_an_answer_heard_just_after_the_deadline_fired_is_late_not_a_duplicate(amqp_url: str, name: str) -> None:
    """``d.done`` taken after A's deadline fired, before A ran again to note it gave up: late, counted once.

    The loop is held past the deadline so that the deadline's timer runs first (it cancels A's wait) and the
    answer's right after, in the same loop turn. A had not yet noted the request as given up, so the answer
    was counted as a duplicate (``unasked``) and the request as neither completed nor late: lost.
    """
    deadline = 0.5
    client = ChainEventsClient(ClientOptions(url=amqp_url, queue=name, size=16, deadline=deadline))
    await client.start()
    try:
        loop = asyncio.get_running_loop()
        operating = asyncio.ensure_future(client.operate(time.monotonic_ns(), False))
        await asyncio.sleep(0)
        (cid,) = client.pending
        waiting = hold_the_loop(deadline / 2, deadline, operating, client.pending[cid])  # both timers due after it
        loop.call_later(deadline * 1.1, client.heard, cid, None)  # after the deadline's own timer in the heap
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(operating, 5)
        assert waiting == [True]
        assert (client.late, client.unasked, client.expired) == (1, 0, 0)
        assert client.given_up == set()  # nothing left waiting for a word that came
    finally:
        await client.stop()
