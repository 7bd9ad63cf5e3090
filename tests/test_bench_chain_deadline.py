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

from amqpkit import Broker, BrokerSettings, RpcClient, RpcTimeout
from amqpkit.bench.base import ClientOptions, ClientSide, ServerOptions
from amqpkit.bench.chain import ROLES, ChainEventsClient, ChainRpcService, Hop
from amqpkit.bench.clients import RawRpcClient
from amqpkit.bench.scenarios import CLIENTS, SERVERS
from amqpkit.codec import BytesCodec

from .waiting import hold_the_loop, wait_for

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
    deadline = 2.0
    client = CLIENTS[scenario](ClientOptions(url=amqp_url, queue=name, size=16, deadline=deadline))
    assert isinstance(client, ChainEventsClient | RawRpcClient)
    await client.start()
    try:
        loop = asyncio.get_running_loop()
        # Timed from before the publish: A's deadline timer, armed after it, is due later than both of these.
        operating = asyncio.ensure_future(client.operate(time.monotonic_ns(), False))
        await asyncio.sleep(0)
        (future,) = client.pending.values()
        waiting = hold_the_loop(deadline / 2, deadline, operating, future)  # the answer's timer and A's due after it
        answer: Any = None if isinstance(client, ChainEventsClient) else b"reply"
        loop.call_later(deadline * 0.9, future.set_result, answer)  # before the deadline's own timer in the heap
        await asyncio.wait_for(operating, 10)  # raised TimeoutError before: the answer was dropped
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
    deadline = 2.0
    client = ChainEventsClient(ClientOptions(url=amqp_url, queue=name, size=16, deadline=deadline))
    await client.start()
    try:
        loop = asyncio.get_running_loop()
        operating = asyncio.ensure_future(client.operate(time.monotonic_ns(), False))
        await asyncio.sleep(0)
        (cid,) = client.pending
        future = client.pending[cid]
        # Timed from when A waits: its deadline timer was armed before now, so the answer's below comes after it.
        await wait_for(lambda: getattr(operating, "_fut_waiter", None) is future, 5)
        waiting = hold_the_loop(deadline / 4, deadline, operating, future)  # both timers are due after it
        loop.call_later(deadline + 0.1, client.heard, cid, None)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(operating, 10)
        assert waiting == [True]
        assert (client.late, client.unasked, client.expired) == (1, 0, 0)
        assert client.given_up == set()  # nothing left waiting for a word that came
    finally:
        await client.stop()


async def test_a_word_on_a_request_already_ended_is_a_duplicate_whatever_it_says(amqp_url: str, name: str) -> None:
    """A second word on a completed request is counted ``unasked``, also when it says "expired".

    An expiry word was counted ``expired`` whether or not anyone still waited: a request completed and then
    said expired was counted twice, and the ledger's ``lost`` came out too low.
    """
    client = ChainEventsClient(ClientOptions(url=amqp_url, queue=name, size=16, deadline=5.0))
    await client.start()
    try:
        operating = asyncio.ensure_future(client.operate(time.monotonic_ns(), False))
        await wait_for(lambda: len(client.pending) == 1, 5)
        (cid,) = client.pending
        client.heard(cid, None)
        await asyncio.wait_for(operating, 5)  # completed
        client.heard(cid, "c")  # the same request, said expired after all
        client.heard(cid, None)  # and done once more
        assert (client.expired, client.late, client.unasked) == (0, 0, 2)
    finally:
        await client.stop()


async def test_a_reply_taken_as_a_hops_deadline_fires_is_passed_on(amqp_url: str, name: str) -> None:
    """chain-rpc: C's call to D gets its reply in the loop turn C's deadline fires in; C passes it on.

    C timed its whole step, the call to D included, under one timer for its deadline, and the call under
    another for the time left. With both due in the turn the reply came in, the outer timer's cancel hid the
    reply from the call, and C counted the request expired.
    """
    budget = 2.0
    services: dict[str, Hop] = {}
    try:
        for role, service_ms in (("d", 10_000), ("c", 0)):  # D never answers in time; C only calls D
            options = ServerOptions(url=amqp_url, queue=name, prefetch=8, service_ms=service_ms, role=role,
                                    deadline=budget)  # fmt: skip
            service = SERVERS["chain-rpc"](options)
            assert isinstance(service, Hop)
            services[role] = service
            await service.start()
        hop = services["c"]
        assert isinstance(hop, ChainRpcService) and hop.client is not None
        to_d = hop.client
        async with Broker(BrokerSettings(url=amqp_url)) as broker:
            caller = RpcClient(broker, f"{name}.c", codec=BytesCodec(), timeout=budget)
            loop = asyncio.get_running_loop()
            sent = loop.time()  # C's deadline is its budget from when the request reached it: later than this
            calling = asyncio.ensure_future(caller.call("step", b"x", returns=bytes))
            await wait_for(lambda: len(to_d._pending) == 1, 5)  # C is calling D
            took = loop.time() - sent
            assert took < budget / 4, f"the request took {took:.2f} s to reach C: too slow for the timers below"
            (cid,) = to_d._pending
            loop.call_at(sent + budget / 2, time.sleep, budget / 2 + budget / 4)  # C's timers due when it returns
            loop.call_at(sent + budget * 0.9, to_d._complete, cid, b"from d", "application/octet-stream")
            with contextlib.suppress(RpcTimeout):  # the caller's own deadline falls in the same turn
                await asyncio.wait_for(calling, 10)
            await wait_for(lambda: hop.received + hop.expired > 0, 5)
            assert (hop.received, hop.expired) == (1, 0)  # (0, 1) before: the reply was dropped
            await caller.close()
    finally:
        for service in reversed(list(services.values())):
            await service.stop()
