"""An Inbox on a quorum queue under an operator's ``delivery-limit`` while PostgreSQL is away for a few seconds.

Each hand-back of a delivery counts against the queue's delivery limit; past it the broker dead-letters the
message, or drops it when the queue has no dead-letter exchange (a shared Subscriber's), without a word."""

# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from typing import Any

from amqpkit import Broker, Exchange, ExchangeType, Queue, Subscriber
from amqpkit.outbox import Inbox

from ..brokerctl import arabbitmqctl, vhost_of
from ..waiting import wait_for
from .test_inbox import Deposit, accounts_table, balance, deposit
from .test_inbox_worker_outage import behind_a_proxy


async def test_a_short_outage_under_an_operators_delivery_limit_loses_nothing(
    broker: Broker, name: str, pg_url: str, pg_schema: str
) -> None:
    """A shared Subscriber's quorum queue under an operator's ``delivery-limit`` of 2; PostgreSQL unreachable for
    8 s. Expected: each message applied once PostgreSQL is back.

    Before: the inbox gave each delivery back at every failure (after 0.5 s, then 1, 2, 4 s), so 3 hand-backs
    within the outage took every message past the limit and the broker dropped it: balance 0 of 5, the queue empty,
    and nothing said but the inbox's "requeued" warnings (a hunt: 20 of 20 lost in a 30 s outage under a limit of
    3, and 8 of 20 tasks of a Worker dead-lettered)."""
    async with behind_a_proxy(pg_url, pg_schema) as (direct, proxy, store):
        inbox = Inbox(store, consumer="ledger", requeue_delay=0.5)

        async def apply(d: Deposit, tx: Any) -> None:
            await tx.execute(
                f"UPDATE {accounts_table(store)} SET balance = balance + $1 WHERE account = $2", d.amount, d.account
            )

        queue = Queue(f"{name}.ledger", type="quorum")
        exchange = Exchange(f"{name}.money", type=ExchangeType.FANOUT, durable=False, auto_delete=True)
        vhost = vhost_of(broker.settings.urls[0])
        limit = f"{name}.limit-{uuid.uuid4().hex[:6]}"
        await arabbitmqctl("set_operator_policy", "-p", vhost, limit, f"^{re.escape(queue.name)}$",
                           '{"delivery-limit": 2}', "--apply-to", "queues")  # fmt: skip
        try:
            async with Subscriber(broker, exchange, inbox.handler(apply), queue=queue) as sub:
                await asyncio.sleep(0.5)  # the policy reaches the queue
                proxy.refusing = True
                proxy.cut()
                for i in range(5):
                    await broker.publish(deposit(1, f"m{i}"), exchange=exchange)
                await asyncio.sleep(8)  # PostgreSQL away for 8 s
                proxy.refusing = False
                with contextlib.suppress(AssertionError):
                    await wait_for(lambda: sub.handled >= 5, timeout=20)
                left = await broker.queue_counts(queue.name)
            got = await balance(direct)
            assert got == 5, f"balance {got} of 5: handled {sub.handled}, left in the queue {left[0]}"
        finally:
            await arabbitmqctl("clear_operator_policy", "-p", vhost, limit)
            await broker.delete_queue(queue.name)
