"""aiormq's errors reach users as amqpkit's own (issue 10: the soak saw a bare RuntimeError escape RpcClient.call)."""

from __future__ import annotations

import aiormq
import pytest

from amqpkit import ConnectionLost
from amqpkit.errors import map_exceptions


async def test_a_channel_asked_of_a_closed_connection_is_connection_lost(amqp_url: str) -> None:
    conn = aiormq.Connection(amqp_url)
    await conn.connect()
    await conn.close()
    with pytest.raises(ConnectionLost), map_exceptions(kind="channel"):
        await conn.channel()


async def test_other_runtime_errors_are_not_relabelled() -> None:
    with pytest.raises(RuntimeError, match="something else"), map_exceptions(kind="channel"):
        raise RuntimeError("something else")
