"""The soak reads what a quorum queue holds for dead-lettering, which list_queues does not show.

A quorum queue with at-least-once dead-lettering keeps a message it could
not yet hand to its dead-letter target among its "discards": it is out of
``messages_ready`` and ``messages_unacknowledged``, so a soak that looked
only at those saw an empty delay queue where a retried task was still held.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import aiormq
from pamqp.commands import Basic

from .brokerctl import arabbitmqctl, vhost_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from soak.main import describe_held, held_for_dead_lettering, parse_quorum_state, quorum_state_expression


async def test_a_message_held_for_dead_lettering_is_seen(amqp_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    target, delay = f"test.soak-state.target.{tag}", f"test.soak-state.delay.{tag}"
    conn = await aiormq.connect(amqp_url)
    try:
        channel = await conn.channel()
        # No target queue: the delay queue's dead-letter worker has nowhere to hand the message over to.
        delay_args: dict[str, Any] = {
            "x-queue-type": "quorum", "x-message-ttl": 100, "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target, "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }  # fmt: skip
        await channel.queue_declare(delay, durable=True, arguments=delay_args)
        await channel.basic_publish(b"held", routing_key=delay, properties=Basic.Properties(delivery_mode=2))
        vhost = vhost_of(amqp_url)
        counts: dict[str, int] = {}
        for _ in range(50):
            await asyncio.sleep(0.2)
            counts = parse_quorum_state(await arabbitmqctl("eval", quorum_state_expression(vhost))).get(delay, {})
            if counts.get("num_discarded", 0) + counts.get("num_discard_checked_out", 0) == 1:
                break
        assert counts.get("num_discarded", 0) + counts.get("num_discard_checked_out", 0) == 1, counts
        assert counts["num_ready_messages"] == 0
        assert held_for_dead_lettering({f"soak.{delay}": counts}) == {f"soak.{delay}": 1}
        assert len(describe_held({f"soak.{delay}": counts})) == 1
        # What list_queues shows for the same queue: nothing ready, nothing unacknowledged.
        listed = await arabbitmqctl(
            "list_queues", "-p", vhost, "name", "messages_ready", "messages_unacknowledged", "--formatter", "json"
        )
        row = next(r for r in json.loads(listed) if r.get("name") == delay)
        assert (row["messages_ready"], row["messages_unacknowledged"]) == (0, 0)
        await channel.queue_delete(delay)
    finally:
        await conn.close()


def test_the_failure_line_tells_a_message_no_worker_took_from_one_in_flight() -> None:
    """The counts a 10-minute soak ended with (RELIABILITY.md, soak finding 4), and a worker's message in flight."""
    stalled = {"num_discarded": 1, "num_discard_checked_out": 0, "num_ready_messages": 0}
    in_flight = {"num_discarded": 0, "num_discard_checked_out": 2, "num_ready_messages": 0}
    lines = describe_held({"soak.tasks.retry.3600": stalled, "soak.tasks.retry.4000": in_flight, "other.q": stalled})
    assert lines == [
        "soak.tasks.retry.3600: 1 waiting and none taken by a dead-letter worker "
        "(held on the broker's side: RELIABILITY.md, soak finding 4)",
        "soak.tasks.retry.4000: 2 taken by its dead-letter worker and not yet accepted, 0 waiting",
    ]
