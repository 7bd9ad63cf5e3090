"""A limit on connections someone else set (a user's or a vhost's ``max-connections``) is named as such.

RabbitMQ answers connection.open past the limit with connection.close and its reason; aiormq reads only that
the frame was not OpenOk. amqpkit took every such close for a vhost it could not use: the error said "check
user, password and vhost: vhost '/' does not exist or the user may not use it", and connect() gave up at the
first attempt, though the limit leaves room again as soon as another connection closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import pytest

from amqpkit import Broker, BrokerSettings, ConnectError, ReconnectPolicy

from .. import processes
from ..brokerctl import as_user, counts, own_user, rabbitmqctl, with_vhost
from ..waiting import until

PASSWORD = f"Pw-{uuid.uuid4().hex[:12]}"
POLICY = ReconnectPolicy(initial_delay=0.05, max_delay=0.2, jitter=0.01, connect_attempts=3)  # 3 quick tries


@pytest.fixture
def user_url(amqp_url: str) -> Iterator[str]:
    """A URL of a user of this test's vhost allowed one connection."""
    with own_user(amqp_url, "amqpkit-conns", PASSWORD) as user:
        rabbitmqctl("set_user_limits", user, json.dumps({"max-connections": 1}))
        yield as_user(amqp_url, user, PASSWORD)


async def test_a_connection_past_the_users_limit_is_named_and_tried_again(user_url: str) -> None:
    user = unquote(urlsplit(user_url).username or "")
    async with Broker(BrokerSettings(url=user_url, reconnect=POLICY)):
        await until(counts("connection", "user", user, 1))
        with pytest.raises(ConnectError) as info:
            await Broker(BrokerSettings(url=user_url, reconnect=POLICY)).connect()
    text = str(info.value)
    assert "connection limit (1) is reached" in text, text
    assert "does not exist" not in text and "check user, password" not in text, text
    assert info.value.reason == "limit"
    assert "after 3 attempts" in text  # tried again, as for a broker that does not answer
    assert PASSWORD not in text

    # room again while connect() tries: it gets in
    await until(counts("connection", "user", user, 0))
    holder = Broker(BrokerSettings(url=user_url, reconnect=POLICY))
    await holder.connect()
    await until(counts("connection", "user", user, 1))
    patient = Broker(BrokerSettings(url=user_url, reconnect=POLICY.model_copy(update={"connect_attempts": 40})))
    connecting = asyncio.create_task(patient.connect())
    await asyncio.sleep(0.5)
    assert not connecting.done()
    await holder.close()
    await asyncio.wait_for(connecting, 15)
    assert patient.is_connected
    await patient.close()


@pytest.mark.usefixtures("spawned")
async def test_amqpkit_check_says_the_limit_is_reached(user_url: str) -> None:
    """Before: "check user, password and vhost" and the hint about user and password, for a limit."""
    async with Broker(BrokerSettings(url=user_url)):
        await until(counts("connection", "user", unquote(urlsplit(user_url).username or ""), 1))
        proc = await processes.spawn(
            sys.executable, "-m", "amqpkit.cli", "check", "--url", user_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 2, (out + err).decode()
    assert "connection limit (1) is reached" in text and "list_user_limits" in text, text
    assert "user and password" not in text and PASSWORD not in text, text


async def test_a_vhosts_limit_is_a_limit_and_a_missing_vhost_named_like_one_is_not(amqp_url: str) -> None:
    vhost = f"amqpkit-conns-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        rabbitmqctl("set_vhost_limits", "-p", vhost, json.dumps({"max-connections": 1}))
        url = with_vhost(amqp_url, vhost)
        async with Broker(BrokerSettings(url=url, reconnect=POLICY)):
            await until(counts("connection", "vhost", vhost, 1))
            with pytest.raises(ConnectError) as info:
                await Broker(BrokerSettings(url=url, reconnect=POLICY)).connect()
        assert info.value.reason == "limit", info.value
        assert f"access to vhost '{vhost}'" in str(info.value) and "connection limit (1) is reached" in str(info.value)
    finally:
        rabbitmqctl("delete_vhost", vhost)
    # a vhost that does not exist is refused at once, whatever its name says
    missing = with_vhost(amqp_url, f"amqpkit connection limit {uuid.uuid4().hex[:8]}")
    with pytest.raises(ConnectError) as info:
        await Broker(BrokerSettings(url=missing, reconnect=POLICY)).connect()
    assert info.value.reason == "refused", info.value
    assert "after 1 attempt" in str(info.value) and "not found" in str(info.value), info.value
