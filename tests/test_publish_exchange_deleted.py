"""An exchange someone else deleted: the publish to it fails, and nothing else does.

A Broker checks an exchange it did not declare once per connection. If
another client deletes it afterwards, the next publish to it makes the broker
close the shared publishing channel. Before: every other publish in flight on
that channel failed with the same "no exchange" error although its own
destination was fine, and publishes queued behind it were written on the
closed channel, so the broker closed the whole connection (504 CHANNEL_ERROR,
"expected 'channel.open'"): every consumer of the Broker went down with it.
"""

from __future__ import annotations

import asyncio

import pytest

from amqpkit import Broker, BrokerSettings, Envelope, PublishError, Queue


@pytest.mark.parametrize("first", [True, False], ids=["bad-publish-first", "bad-publish-amid"])
async def test_only_the_publish_to_the_deleted_exchange_fails(
    broker: Broker, settings: BrokerSettings, name: str, cleanup: list[str], first: bool
) -> None:
    cleanup.append(f"q:{name}")
    await broker.declare_queue(Queue(name))
    async with Broker(settings) as other:
        channel = await other.lowlevel.open_channel()
        await channel.exchange_declare(f"{name}.theirs", exchange_type="fanout")
        try:
            await broker.publish(Envelope(b"seen"), exchange=f"{name}.theirs")  # checked: it exists
            await channel.exchange_delete(f"{name}.theirs")
            reconnects = broker.reconnects
            good = [broker.publish(Envelope(b"fine"), routing_key=name) for _ in range(20)]
            bad = broker.publish(Envelope(b"lost"), exchange=f"{name}.theirs")
            results = await asyncio.gather(*([bad, *good] if first else [*good[:10], bad, *good[10:]]),
                                           return_exceptions=True)  # fmt: skip
            bad_result = results[0] if first else results[10]
            good_results = [r for r in results if r is not bad_result]
            assert isinstance(bad_result, PublishError), bad_result
            assert "theirs" in str(bad_result)
            assert [r for r in good_results if r is not None] == []
            assert broker.reconnects == reconnects, "the connection went down"
            assert (await broker.queue_counts(name))[0] >= 20
            # A later publish to it fails the same way, and one to a live destination goes through.
            with pytest.raises(PublishError, match="theirs"):
                await broker.publish(Envelope(b"again"), exchange=f"{name}.theirs")
            await broker.publish(Envelope(b"after"), routing_key=name)
        finally:
            await channel.exchange_delete(f"{name}.theirs")


async def test_the_exchanges_known_to_exist_are_a_bounded_cache(
    broker: Broker, settings: BrokerSettings, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One name was kept for every exchange ever published to that this Broker had not declared (a hunt: 1,724
    after 5 minutes of short-lived exchanges); they are checked again once the cache is full."""
    from amqpkit import Exchange, publishing

    monkeypatch.setattr(publishing, "KNOWN_EXCHANGES_KEPT", 3)
    names = [f"{name}.x{i}" for i in range(6)]
    for exchange in names:
        await broker.declare_exchange(Exchange(exchange, type="fanout", durable=False, auto_delete=False))
    try:
        async with Broker(settings) as other:  # did not declare them: checks each before its first publish
            for exchange in names * 2:
                await other.publish(Envelope(b"x"), exchange=exchange, routing_key="")
                assert len(other._known_exchanges) <= 3
    finally:
        for exchange in names:
            await broker.delete_exchange(exchange)
