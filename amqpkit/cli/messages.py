"""Commands for one message at a time: ``publish``, ``consume`` and ``call``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any

import typer

from ..connection import Broker
from ..errors import AmqpkitError, PublishError, RpcError
from . import UrlOption, app, positive_seconds, run_broker_job

CONSUME_PREFETCH = 100  # `consume`'s messages unacked at a time, at most (fewer with a smaller --count)


def _headers(pairs: list[str] | None) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"headers are KEY=VALUE, not {pair!r}")
        headers[key] = value
    return headers


def _show(delivery: Any) -> str:
    body = delivery.body
    try:
        shown = body.decode("utf-8")
    except UnicodeDecodeError:
        shown = repr(body)
    return f"[{delivery.exchange or '(default)'} {delivery.routing_key!r} id={delivery.message_id}] {shown}"


@app.command()
def publish(
    body: Annotated[str | None, typer.Argument(help="message body, as UTF-8 text")] = None,
    exchange: Annotated[str, typer.Option("--exchange", "-e", help="exchange ('' is the default exchange)")] = "",
    routing_key: Annotated[str, typer.Option("--routing-key", "-k", help="routing key (a queue name on '')")] = "",
    json_body: Annotated[str | None, typer.Option("--json", help="body as a JSON document instead")] = None,
    header: Annotated[list[str] | None, typer.Option("--header", "-H", help="KEY=VALUE, repeatable")] = None,
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="how many copies")] = 1,
    transient: Annotated[bool, typer.Option("--transient", help="delivery mode 1 (not persistent)")] = False,
    mandatory: Annotated[bool, typer.Option("--mandatory", help="fail if no queue takes it")] = False,
    url: UrlOption = None,
) -> None:
    """Publish a message (each one confirmed by the broker)."""
    import json

    from ..message import Envelope

    if json_body is not None:
        try:
            payload = json.dumps(json.loads(json_body)).encode()
        except ValueError as exc:
            raise typer.BadParameter(f"--json is not valid JSON: {exc}") from None
        content_type = "application/json"
    elif body is not None:
        payload, content_type = body.encode(), "text/plain; charset=utf-8"
    else:
        raise typer.BadParameter("give a BODY or --json")
    headers = _headers(header)

    async def job(broker: Broker) -> int:
        for _ in range(count):
            envelope = Envelope(payload, content_type=content_type, headers=dict(headers), persistent=not transient)
            await broker.publish(envelope, exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        return count

    try:
        sent = run_broker_job(url, job)
    except PublishError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"published {sent} message(s) to {exchange or '(default exchange)'!r} with key {routing_key!r}, confirmed"
    )


@app.command()
def consume(
    queue: Annotated[str | None, typer.Option("--queue", "-q", help="consume this queue (messages are acked)")] = None,
    exchange: Annotated[str | None, typer.Option("--exchange", "-e", help="or bind a private queue to this")] = None,
    binding: Annotated[list[str] | None, typer.Option("--binding", "-b", help="binding key, repeatable")] = None,
    exchange_type: Annotated[str, typer.Option("--exchange-type", help="type of --exchange")] = "topic",
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="stop after N messages")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0, help="stop after S seconds")] = None,
    url: UrlOption = None,
) -> None:
    """Print the messages of a queue, or of an exchange through a private queue, one line each.

    With ``--count N`` no more than N are delivered, so none is handed back: the broker may have at most
    ``prefetch`` unacked, and the acks that would let it send past N wait until the Nth is shown (or the timeout).
    Handed back, a message would be marked redelivered, go to the back of a quorum queue, and count towards its
    delivery limit."""
    from ..topology import Binding, Exchange, ExchangeType, Queue

    if (queue is None) == (exchange is None):
        raise typer.BadParameter("give --queue or --exchange (with --binding)")

    stopped: list[BaseException] = []

    prefetch = min(count or CONSUME_PREFETCH, CONSUME_PREFETCH)

    async def job(broker: Broker) -> int:
        done = asyncio.Event()
        seen = acked = 0
        held: list[Any] = []  # shown, acked once the count is reached (see the docstring)

        def lost(exc: BaseException) -> None:
            # Stopped for good (its queue deleted and not ours to declare, say): nothing more can come.
            stopped.append(exc)
            done.set()

        async def show(delivery: Any) -> None:
            nonlocal seen, acked
            if count is not None and seen >= count:
                # Not on one channel (at most `count` delivered), but a re-attach hands the held ones again
                await delivery.nack(requeue=True)
                return
            seen += 1
            typer.echo(_show(delivery))
            if count is None or acked + 1 + prefetch <= count:
                acked += 1
                await delivery.ack()
            else:
                held.append(delivery)
            if count is not None and seen >= count:
                done.set()

        async def start() -> Any:
            if queue is not None:
                # Someone else's queue: consumed as it is, never declared with a spec of ours.
                return await broker.consume(Queue(queue), show, prefetch=prefetch, declare=False, on_error=lost)
            assert exchange is not None
            private = Queue(exclusive=True, auto_delete=True, durable=False)
            spec = Exchange(exchange, type=ExchangeType(exchange_type))
            for key in binding or ["#"]:
                await broker.bind(Binding(spec, private, routing_key=key))
            return await broker.consume(private, show, prefetch=prefetch, on_error=lost)

        starting = asyncio.ensure_future(start())
        try:
            # Shielded: messages may come (and be shown) before consume() returns, and a Ctrl-C meanwhile must not
            # stop consume() there, which closes the consumer's channel and hands them back unacked.
            consumer = await asyncio.shield(starting)
            typer.echo(f"consuming from {queue or exchange!r}; Ctrl-C stops", err=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await done.wait()
        finally:  # Ctrl-C too: shown, so acked, not handed back
            await asyncio.shield(_settle_held(broker, starting, held))
        await consumer.cancel()
        return seen

    try:
        seen = run_broker_job(url, job, log_level=logging.WARNING)  # a reconnect is worth a line
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    typer.echo(f"{seen} message(s)", err=True)
    if stopped:
        typer.echo(f"error: the consumer stopped: {stopped[0]}", err=True)
        raise typer.Exit(1)


async def _settle_held(broker: Broker, starting: asyncio.Future[Any], held: list[Any]) -> None:
    """``consume``'s end: once ``starting`` (its consume()) has ended, ack the messages it showed and held, after
    the broker has answered the consumer's basic.cancel (the consumer is the Broker's only one): an ack before it
    would let the broker send more (to be handed back), and the close of the channel that the stop makes would hand
    back what is not acked."""
    if not starting.done():
        await asyncio.wait({starting}, timeout=10)
    if held:
        for consumer in broker.consumers:
            channel = consumer._channel
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):  # the connection lost meanwhile: the held ones go back, not lost
                    await asyncio.wait_for(channel.basic_cancel(consumer.consumer_tag), 5)
            running = [t for t in consumer.inflight if not t.done()]  # deliveries sent before the cancel-ok
            if running:
                await asyncio.wait(running, timeout=5)
        for delivery in held:
            # A channel closed meanwhile (the queue deleted, the connection lost) gave it back already: no ack
            with contextlib.suppress(AmqpkitError):
                await delivery.ack()
    if not starting.done():
        starting.cancel()
    elif not starting.cancelled():
        starting.exception()  # raised in consume when it failed, unless a Ctrl-C came first: retrieved here


@app.command()
def call(
    queue: Annotated[str, typer.Argument(help="the server's request queue")],
    method: Annotated[str, typer.Argument(help="method name ('-' for none, as the tutorial's server takes)")],
    payload: Annotated[str, typer.Argument(help="request as JSON")] = "null",
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for the reply")] = 10.0,
    url: UrlOption = None,
) -> None:
    """Call an RPC method and print the reply (or the remote error, exit 1)."""
    import json

    from ..patterns.rpc import RpcClient

    positive_seconds(timeout, "--timeout")  # a call always ends
    try:
        request = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise typer.BadParameter(f"PAYLOAD is not valid JSON: {exc}") from None

    async def job(broker: Broker) -> Any:
        async with RpcClient(broker, queue, timeout=timeout) as client:
            return await client.call(None if method == "-" else method, request)

    try:
        reply = run_broker_job(url, job)
    except RpcError as exc:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(reply if isinstance(reply, str) else json.dumps(reply))
