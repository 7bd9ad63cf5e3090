"""A publish's deadline and its basic.return in the same event-loop turn (a loop stalled under load).

aiormq set the outcome of the publish's confirmation future without checking it was still pending: the
deadline had cancelled it, so the channel's reader died with InvalidStateError. The channel read nothing more,
every confirmed publish on it timed out, and 10 s later aiormq's second close on a number the broker had freed
made the broker close the whole connection (504 CHANNEL_ERROR - expected 'channel.open'). A helper's hunt
reproduced it 5 times in 5 with one stall; under load it closed a connection three times in 5 minutes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from amqpkit import Broker, Envelope, PublishTimeout, Unroutable

RETURN_METHOD = (60).to_bytes(2, "big") + (50).to_bytes(2, "big")  # basic.return, as it is on the wire


async def test_a_return_read_in_the_turn_its_publish_timed_out_leaves_the_channel_working(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    armed = [False]
    feed = asyncio.StreamReader.feed_data

    def feed_data(self: asyncio.StreamReader, data: Any) -> None:
        feed(self, data)
        if armed[0] and RETURN_METHOD in bytes(data):
            armed[0] = False
            time.sleep(0.5)  # the loop stalls in the turn that read the return, past the publish's deadline

    monkeypatch.setattr(asyncio.StreamReader, "feed_data", feed_data)
    reconnects = broker.reconnects
    armed[0] = True
    with pytest.raises((PublishTimeout, Unroutable)):
        await broker.publish(Envelope(b"x"), routing_key="amqpkit-nobody-here", mandatory=True, timeout=0.2)
    assert not armed[0], "no basic.return was read: the test proves nothing"
    for _ in range(5):  # the channel still confirms (before: every one timed out, then the connection closed)
        await broker.publish(Envelope(b"y"), routing_key="amqpkit-nobody-here", timeout=2)
        await asyncio.sleep(0.2)
    with pytest.raises(Unroutable):
        await broker.publish(Envelope(b"z"), routing_key="amqpkit-nobody-here", mandatory=True, timeout=2)
    assert broker.reconnects == reconnects
