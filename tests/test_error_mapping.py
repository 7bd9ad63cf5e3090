"""aiormq's errors reach users as amqpkit's own (issue 10: the soak saw a bare RuntimeError escape RpcClient.call)."""

from __future__ import annotations

import aiormq
import pytest

from amqpkit import ConnectionLost
from amqpkit.errors import map_exceptions, publish_refused_for, refusal_is_for


async def test_a_channel_asked_of_a_closed_connection_is_connection_lost(amqp_url: str) -> None:
    conn = aiormq.Connection(amqp_url)
    await conn.connect()
    await conn.close()
    with pytest.raises(ConnectionLost), map_exceptions(kind="channel"):
        await conn.channel()


async def test_other_runtime_errors_are_not_relabelled() -> None:
    with pytest.raises(RuntimeError, match="something else"), map_exceptions(kind="channel"):
        raise RuntimeError("something else")


REFUSALS = [
    # RabbitMQ's reply texts (403 ACCESS_REFUSED), whole and cut at 255 bytes with "..." appended
    ("ACCESS_REFUSED - access to exchange 'orders' in vhost 'v' refused for user 'u'", ("orders", None, False)),
    (
        "ACCESS_REFUSED - write access to exchange 'amq.default' in vhost 'v' refused for user 'u'",
        ("amq.default", None, False),
    ),
    (
        "ACCESS_REFUSED - access to topic 'bad.1' in exchange 'events' in vhost 'v' refused for user 'u'",
        ("events", "bad.1", False),
    ),
    ("ACCESS_REFUSED - access to topic 'bad.1.kkkkkkk...", (None, "bad.1.kkkkkkk", True)),
    ("ACCESS_REFUSED - access to topic 'bad.1' in exch...", (None, "bad.1", True)),
    ("ACCESS_REFUSED - access to topic 'bad.1' in exchange 'even...", ("even", "bad.1", True)),
    ("ACCESS_REFUSED - access to exchange 'ord...", ("ord", None, True)),
]


@pytest.mark.parametrize(("text", "expected"), REFUSALS)
def test_a_permission_refusal_is_read_whole_or_cut(text: str, expected: tuple[str | None, str | None, bool]) -> None:
    refused = publish_refused_for(aiormq.exceptions.ChannelAccessRefused(text))
    assert refused == expected


def test_a_cut_refusal_names_a_publish_only_when_its_names_begin_alike() -> None:
    whole = ("events", "bad.1", False)
    assert refusal_is_for(whole, "events", "bad.1") is True
    assert refusal_is_for(whole, "events", "ok.1") is False
    assert refusal_is_for(whole, "other", "bad.1") is False
    assert refusal_is_for(("amq.default", None, False), "", "anything") is True
    cut_key = (None, "bad.1.kkk", True)
    assert refusal_is_for(cut_key, "events", "bad.1.kkkkkk") is None  # maybe: counted
    assert refusal_is_for(cut_key, "events", "ok.1.kkkkkk") is False
    cut_exchange = ("eve", "bad.1", True)
    assert refusal_is_for(cut_exchange, "events", "bad.1") is None
    assert refusal_is_for(cut_exchange, "events", "bad.2") is False
    assert refusal_is_for(cut_exchange, "orders", "bad.1") is False


QUEUE_TYPE_REFUSALS = [
    # 406 for x-queue-type: 4.0.5's text, 3.10.8's (a queue declared without a type: "none"), and one cut short
    ("received 'classic' but current is 'quorum'", "type='quorum')"),
    (
        "received the value 'classic' of type 'longstr' but current is the value 'stream' of type 'longstr'",
        "type='stream')",
    ),
    ("received the value 'quorum' of type 'longstr' but current is none", "type='classic')"),
    ("received the value 'classic' of type 'longstr' but curr...", "type=...)"),
]


@pytest.mark.parametrize(("tail", "hint"), QUEUE_TYPE_REFUSALS)
def test_a_queue_of_another_type_is_named_with_the_type_to_declare(tail: str, hint: str) -> None:
    from amqpkit import TopologyError

    text = f"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'jobs' in vhost 'v': {tail}"
    with pytest.raises(TopologyError) as caught, map_exceptions(kind="queue", name="jobs"):
        raise aiormq.exceptions.ChannelPreconditionFailed(text)
    assert caught.value.argument == "x-queue-type"
    assert f"Queue('jobs', {hint}" in str(caught.value)
