"""The topology registry: declare, bind, delete and purge, and what a reconnect declares again.

Every exchange, queue and binding declared through the Broker is remembered
and declared again after a reconnect, until it is deleted or forgotten
(:meth:`TopologyRegistry.forget`). A server-named queue is known by the
name the broker gave it on the current connection (:meth:`queue_name`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiormq.exceptions import ChannelLockedResource, ChannelNotFoundEntity

from .channels import BrokerCore, channel_cap_hold
from .errors import (
    ChannelLimitReached,
    ConnectionLost,
    TopologyError,
    access_refused,
    caused_by,
    denied_feature,
    deprecated_denied,
    map_exceptions,
    not_found_saying,
    queue_unavailable,
    same_refusal,
)
from .topology import Binding, Exchange, Queue

__all__ = ["TopologyRegistry"]

Refused = tuple[Exchange | Queue | Binding, TopologyError]

log = logging.getLogger("amqpkit.broker")

REBIND_AT_MOST_EVERY = 1.0
"""Seconds between two rounds of the keeper of bindings that publishes finding an exchange gone ask for, at least."""

_DEPRECATED_IN_QUEUE: dict[str, Callable[[Queue], bool]] = {
    # RabbitMQ 4.x's deprecated features a queue's declare uses, by their names in its refusal
    "transient_nonexcl_queues": lambda q: not q.durable and not q.exclusive,
    "queue_master_locator": lambda q: "x-queue-master-locator" in q.declare_arguments(),
}


class TopologyRegistry(BrokerCore):
    """The Broker's topology layer (a base of :class:`~amqpkit.Broker`)."""

    async def declare(self, *specs: Exchange | Queue | Binding) -> None:
        """Declare specs in the order given and remember them for reconnects."""
        for spec in specs:
            if isinstance(spec, Exchange):
                await self.declare_exchange(spec)
            elif isinstance(spec, Queue):
                await self.declare_queue(spec)
            else:
                await self.bind(spec)

    async def declare_exchange(self, exchange: Exchange) -> None:
        if exchange.is_builtin:
            return
        await self._ready()
        await self._declare_exchange_on(exchange)
        self._exchanges[exchange.name] = exchange
        self._known_exchanges.add(exchange.name)

    async def declare_queue(self, queue: Queue) -> str:
        """Declare ``queue``; returns its name (the broker's choice for a server-named queue)."""
        await self._ready()
        name = await self._declare_queue_on(queue)
        # A named queue re-declared with a different spec replaces the old one.
        self._queues.pop(queue, None)
        self._queues[queue] = name
        return name

    async def bind(self, binding: Binding) -> None:
        await self.declare_exchange(binding.exchange)
        if binding.queue not in self._queues:
            await self.declare_queue(binding.queue)
        await self._bind_on(binding)
        self._bindings[binding] = None

    async def unbind(self, binding: Binding) -> None:
        await self._ready()
        async with self._topology() as channel:
            with map_exceptions(kind="binding", name=binding.routing_key):
                await channel.queue_unbind(
                    queue=self.queue_name(binding.queue),
                    exchange=binding.exchange.name,
                    routing_key=binding.routing_key,
                    arguments=binding.bind_arguments() or None,
                )
            self._bindings.pop(binding, None)

    def forget(self, *specs: Exchange | Queue | Binding) -> None:
        """Stop remembering ``specs``: a reconnect will not declare them again. Nothing is sent to the broker.

        A forgotten queue takes its bindings with it; a forgotten exchange
        takes the bindings to it. Consumers are not touched (cancel them).
        Use it when a pattern stops using topology it declared, so that the
        next reconnect does not bring back, say, a stopped subscription's
        queue that would then collect messages nobody reads.
        """
        for spec in specs:
            if isinstance(spec, Exchange):
                if self._exchanges.get(spec.name) == spec:
                    del self._exchanges[spec.name]
                for b in [b for b in self._bindings if b.exchange.name == spec.name]:
                    del self._bindings[b]
            elif isinstance(spec, Queue):
                self._queues.pop(spec, None)
                for b in [b for b in self._bindings if b.queue == spec]:
                    del self._bindings[b]
            else:
                self._bindings.pop(spec, None)

    def remembers(self, spec: Exchange | Queue | Binding) -> bool:
        """Whether ``spec`` is declared again after a reconnect."""
        if isinstance(spec, Exchange):
            return self._exchanges.get(spec.name) == spec
        if isinstance(spec, Queue):
            return spec in self._queues
        return spec in self._bindings

    def queue_name(self, queue: Queue) -> str:
        """The live name of a declared queue."""
        if queue.server_named:
            try:
                return self._queues[queue]
            except KeyError:
                raise TopologyError("server-named queue used before it was declared", kind="queue") from None
        return queue.name

    async def delete_queue(self, queue: Queue | str, *, if_unused: bool = False, if_empty: bool = False) -> int:
        """Delete a queue and forget it, with its bindings; returns the messages it held.

        This Broker's consumers of it stop when the broker cancels them: quietly (an INFO line), each with a
        TopologyError saying so as its ``error`` and for its ``on_error``, where a queue someone else deleted is
        a WARNING and an ERROR. A deletion the broker refuses (``if_unused``, ``if_empty``, a permission: a
        TopologyError) forgets nothing; one cut short after it was sent (the connection lost, a timeout) may
        have happened, and stays a deletion.
        """
        await self._ready()
        async with self._topology() as channel:
            # The name and what to forget are taken only now, with the connection up and its channel held: a
            # reconnect under way has declared the queue again (a server-named one under a new name) and attached
            # its consumers by now. Forgotten before the delete is sent: the broker's cancel of a consumer of it
            # may come before the delete-ok, and must not find it remembered, to declare it again.
            name = queue if isinstance(queue, str) else self.queue_name(queue)
            queues = {spec: live for spec, live in self._queues.items() if live == name}
            bindings = [b for b in self._bindings if b.queue in queues]
            for spec in queues:
                del self._queues[spec]
            for b in bindings:
                del self._bindings[b]
            marked = self._deleting(name)
            try:
                with map_exceptions(kind="queue", name=name):
                    result = await channel.queue_delete(name, if_unused=if_unused, if_empty=if_empty)
            except TopologyError:
                # Refused: the queue is still there, remembered again as it was.
                self._not_deleting(marked)
                for spec, live in queues.items():
                    self._queues.setdefault(spec, live)
                for b in bindings:
                    if b.queue in self._queues:
                        self._bindings.setdefault(b, None)
                raise
        return int(result.message_count or 0)

    def _deleting(self, name: str) -> list[Any]:
        """Mark what reads the queue ``name`` as :meth:`delete_queue` deletes it (what another delete has not
        marked already); returns what it marked. Nothing here; the consuming layer marks its consumers."""
        return []

    def _not_deleting(self, marked: list[Any]) -> None:
        """Unmark what :meth:`_deleting` marked, the delete refused."""

    async def delete_exchange(self, name: str | Exchange, *, if_unused: bool = False) -> None:
        """Delete an exchange and forget it, with the bindings to it. A deletion the broker refuses (``if_unused``,
        a permission) forgets nothing."""
        name = name if isinstance(name, str) else name.name
        await self._ready()
        async with self._topology() as channel:
            # Forgotten once the connection is up and its channel held, as in delete_queue.
            exchange = self._exchanges.pop(name, None)
            bindings = [b for b in self._bindings if b.exchange.name == name]
            for b in bindings:
                del self._bindings[b]
            try:
                with map_exceptions(kind="exchange", name=name):
                    await channel.exchange_delete(name, if_unused=if_unused)
            except TopologyError:  # refused; cut short after it was sent, it may have happened: stays forgotten
                if exchange is not None:
                    self._exchanges.setdefault(name, exchange)
                for b in bindings:
                    if b.queue in self._queues:
                        self._bindings.setdefault(b, None)
                raise
            self._known_exchanges.discard(name)

    async def purge_queue(self, queue: Queue | str) -> int:
        name = queue if isinstance(queue, str) else self.queue_name(queue)
        await self._ready()
        async with self._topology() as channel:
            with map_exceptions(kind="queue", name=name):
                result = await channel.queue_purge(name)
            return int(result.message_count or 0)

    async def queue_counts(self, queue: Queue | str) -> tuple[int, int]:
        """``(messages ready, consumers)`` of an existing queue; TopologyError when it does not exist."""
        name = queue if isinstance(queue, str) else self.queue_name(queue)
        await self._ready()
        async with self._topology() as channel:
            with map_exceptions(kind="queue", name=name):
                result = await channel.queue_declare(name, passive=True)
            return int(result.message_count or 0), int(result.consumer_count or 0)

    async def _declare_exchange_on(self, exchange: Exchange) -> None:
        async with self._topology() as channel:
            with map_exceptions(kind="exchange", name=exchange.name):
                await channel.exchange_declare(
                    exchange=exchange.name,
                    exchange_type=str(exchange.type),
                    durable=exchange.durable,
                    auto_delete=exchange.auto_delete,
                    internal=exchange.internal,
                    arguments=dict(exchange.arguments) or None,
                )

    async def _declare_queue_on(self, queue: Queue) -> str:
        async with self._topology() as channel:
            try:
                with map_exceptions(kind="queue", name=queue.name):
                    result = await channel.queue_declare(
                        queue=queue.name,
                        durable=queue.durable,
                        exclusive=queue.exclusive,
                        auto_delete=queue.auto_delete,
                        arguments=queue.declare_arguments() or None,
                    )
            except ConnectionLost as exc:
                # RabbitMQ 4.x denying deprecated features closes the connection at a queue that uses one: a
                # ConnectionLost reads as a passing fault, and each retry cut the connection again.
                feature = denied_feature(exc)
                if feature is not None and feature in _DEPRECATED_IN_QUEUE and _DEPRECATED_IN_QUEUE[feature](queue):
                    raise deprecated_denied("queue", queue.name, feature) from exc
                raise
            name = str(result.queue)
            if queue.server_named:
                self._queues[queue] = name
            return name

    async def _bind_on(self, binding: Binding, *, if_remembered: bool = False) -> bool:
        """Bind ``binding`` on the topology channel; with ``if_remembered``, only if the Broker still remembers it
        once it holds the channel (an unbind() or forget() meanwhile: the keeper of bindings must not bind again
        what was just removed). Whether it was bound."""
        async with self._topology() as channel:
            if if_remembered and binding not in self._bindings:
                return False
            queue_name = self.queue_name(binding.queue)
            with map_exceptions(kind="binding", name=f"{binding.exchange.name}->{queue_name}"):
                await channel.queue_bind(
                    queue=queue_name,
                    exchange=binding.exchange.name,
                    routing_key=binding.routing_key,
                    arguments=binding.bind_arguments() or None,
                )
        return True

    async def _bind_again(self, binding: Binding) -> None:
        """Bind again after a reconnect or a refusal; a bind to an exchange of the Broker's own that a 404 says is
        missing declares the exchange and binds once more: deleted between the Broker's declare and its bind (its
        vhost being deleted), or meanwhile by someone else, it is the Broker's to declare."""
        try:
            await self._bind_on(binding)
        except TopologyError as exc:
            exchange = binding.exchange
            if not (
                isinstance(exc.__cause__, ChannelNotFoundEntity) and self._exchanges.get(exchange.name) == exchange
            ):
                raise
            await self._declare_exchange_on(exchange)
            await self._bind_on(binding)

    def _keep_bindings_running(self) -> None:
        """Start the keeper of bindings (:meth:`_keep_bindings`), unless it runs or ``binding_check_interval`` is 0."""
        if self.settings.binding_check_interval > 0 and (self._binding_keeper is None or self._binding_keeper.done()):
            self._binding_keeper = self._spawn(self._keep_bindings())

    async def _keep_bindings(self) -> None:
        """Bind again, every ``settings.binding_check_interval`` seconds, the bindings of the queues this Broker's
        consumers read: one ``queue.bind`` each, which the broker takes as done when the binding is there.

        Deleting an exchange deletes its bindings, and an exchange made again (by an operator, a definitions
        import, another service's start or reconnect) has none: a consumer of a queue bound to it went on reading
        a queue nothing was routed to, and every message published to the exchange reached nobody, without an
        error, for as long as the process ran. A bind that finds the exchange missing (404) declares it first if
        this Broker declared it (a reconnect or a restart of the service would declare it too), and says so once,
        as a WARNING; one that cannot (not the Broker's, or refused) says once that the queue receives nothing
        from it, and once, as INFO, that it is bound again when it is. A bind cannot tell a binding it made again
        from one that was there: an exchange someone else made again is not said.

        A publish that finds an exchange of the Broker's own missing asks for a round at once (at most one a
        second), which declares it and binds again this Broker's queues, so its next publish reaches them; the
        bindings of other processes' queues come back at their own keeper's next round. Nothing is sent per
        message; while the connection is down the reconnect declares everything again."""
        interval = self.settings.binding_check_interval
        loop = asyncio.get_running_loop()
        due = loop.time() + interval
        last = float("-inf")  # when the last round ran
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - loop.time())):
                    await self._rebind_wanted.wait()
            early = last + min(REBIND_AT_MOST_EVERY, interval) - loop.time()
            if early > 0:
                await asyncio.sleep(early)
            self._rebind_wanted.clear()
            last = loop.time()
            due = last + interval
            if self._closing:
                return
            if not self.is_connected:
                continue  # the reconnect binds everything again
            try:
                await self._rebind_consumed()
            except ConnectionLost:
                continue
            except ChannelLimitReached as exc:  # the topology channel, closed by a 404, not given back for now
                log.debug("binding again the queues this Broker consumes waits for a channel: %s", exc)
            except Exception:
                log.exception("binding again the queues this Broker consumes failed; tried again in %g s", interval)

    async def _rebind_consumed(self) -> None:
        """One round of :meth:`_keep_bindings`: the bindings of attached consumers' queues, exchange by exchange
        (not those waiting for the broker to allow them: see :meth:`_keep_refused`)."""
        consumed = {c.queue for c in self._consumers.values() if not c.cancelled and c.attached.is_set()}
        refused = self._access_refused
        by_exchange: dict[str, list[Binding]] = {}
        for binding in self._bindings:
            if binding.queue in consumed and binding not in refused and binding.queue not in refused:
                by_exchange.setdefault(binding.exchange.name, []).append(binding)
        generation = self.generation
        for name, bindings in by_exchange.items():
            if self.generation != generation or not self.is_connected:
                return  # a reconnect meanwhile binds everything again (and names server-named queues anew)
            await self._rebind_exchange(name, bindings)
        for name in [n for n in self._exchanges_gone if n not in by_exchange]:
            del self._exchanges_gone[name]  # nothing consumed here is bound to it any more

    async def _rebind_exchange(self, name: str, bindings: list[Binding]) -> None:
        """Bind ``bindings`` (all to the exchange ``name``) again; declare the exchange first if it is gone and the
        Broker's own. Says what it found, once (see :meth:`_keep_bindings`)."""
        redeclared = False
        gone: TopologyError | None = None
        bound: list[Binding] = []
        for binding in bindings:
            try:
                try:
                    if not await self._bind_on(binding, if_remembered=True):
                        continue  # unbound or forgotten meanwhile (its subscription stopped)
                except TopologyError as exc:
                    if not _no_exchange(exc):
                        raise
                    if redeclared or self._exchanges.get(name) != binding.exchange:
                        why = "deleted again at once" if redeclared else "not declared by this Broker"
                        gone = TopologyError(f"{why}: {exc}", kind="exchange", name=name)
                        break
                    try:
                        await self._declare_exchange_on(binding.exchange)
                    except TopologyError as refused:
                        gone = TopologyError(f"declaring it again was refused: {refused}", kind="exchange", name=name)
                        break
                    self._known_exchanges.add(name)
                    redeclared = True
                    if not await self._bind_on(binding, if_remembered=True):
                        continue
            except TopologyError as exc:
                # its queue deleted under its consumer (the consumer's cancel brings it back), a refusal of access
                # (the reconnect's and the consumer's own retries look after it), ...: not this keeper's
                log.debug("could not bind %s again: %s", _describe(binding), exc)
                continue
            bound.append(binding)
        if bound and not redeclared and not await self._still_as_declared(name):
            return
        self._say_rebound(name, bindings, bound, redeclared, gone)

    def _say_rebound(
        self, name: str, bindings: list[Binding], bound: list[Binding], redeclared: bool, gone: TopologyError | None
    ) -> None:
        """What a round of :meth:`_rebind_exchange` found for the exchange ``name``, said once."""
        names = list(dict.fromkeys(repr(self._shown_queue(b.queue)) for b in (bound or bindings)))
        queues = f"queue{'s' if len(names) > 1 else ''} {', '.join(names)}"
        since = self._exchanges_gone.get(name)
        if gone is not None:
            if since is None:
                self._exchanges_gone[name] = time.monotonic()
                log.warning("exchange %r is gone (%s): %s %s nothing from it until it is back; bound again every "
                            "%g s", name, gone, queues, "receive" if len(names) > 1 else "receives",
                            self.settings.binding_check_interval)  # fmt: skip
            return
        if not (bound or redeclared):
            return  # none bound, for reasons of their own (said at DEBUG): whether it is back is not known yet
        if since is not None:
            del self._exchanges_gone[name]
        if redeclared:
            log.warning("exchange %r was gone (deleted by someone else%s): declared again, as this Broker declared "
                        "it, and %s bound to it again", name,
                        f", gone for {time.monotonic() - since:.1f} s" if since is not None else "",
                        queues)  # fmt: skip
        elif since is not None:
            log.info("exchange %r is back after %.1f s: %s bound to it again", name, time.monotonic() - since,
                     queues)  # fmt: skip

    async def _still_as_declared(self, name: str) -> bool:
        """False once the exchange ``name`` is found to be something else than this Broker declared (then forgotten,
        with its bindings and their consumers: :meth:`_exchange_changed`). A bind is taken by an exchange of any
        type, so one made again as another (a direct or fanout exchange where this Broker declared a topic one) is
        found by declaring it as declared: one round trip per exchange and round. An exchange not of this Broker's
        is not looked at."""
        exchange = self._exchanges.get(name)
        if exchange is None:
            return True
        try:
            await self._declare_exchange_on(exchange)
        except TopologyError as exc:
            if not _made_otherwise(exc):
                return True  # refused access, say: as the binds, not this keeper's (see _keep_refused)
            await self._exchange_changed(exchange, exc)
            return False
        return True

    async def _exchange_changed(self, exchange: Exchange, exc: TopologyError) -> set[Queue]:
        """``exchange``, declared by this Broker, is now something else (someone deleted it and declared it again
        otherwise): forget it and the bindings to it, and take those bindings off it (the keeper's round has just
        made them there). Returns the queues that were bound to it; their consumers stop
        (:meth:`Consuming._exchange_changed`)."""
        log.error("exchange %r is not what this Broker declared any more (made again by someone else): %s; "
                  "forgotten, with the subscriptions bound to it", exchange.name, exc)  # fmt: skip
        bindings = [b for b in self._bindings if b.exchange.name == exchange.name]
        self._exchanges_gone.pop(exchange.name, None)
        specs: list[Exchange | Binding] = [exchange, *bindings]
        for spec in specs:
            self._forget_with(spec, exc)
        for binding in bindings:
            with contextlib.suppress(Exception):
                await self.unbind(binding)
        return {b.queue for b in bindings}

    def _shown_queue(self, queue: Queue) -> str:
        return queue.name or self._queues.get(queue, "") or "(server-named)"

    async def _restore_topology(self) -> tuple[list[Refused], dict[Queue, TopologyError]]:
        """Declare again everything remembered, on a new connection.

        What the broker refuses does not stop the rest: returns the refused
        specs, and the queues that failed (with the error) so that their
        consumers can be stopped.
        """
        refused: list[Refused] = []
        held: dict[str, TopologyError] = {}  # exchanges refused access: their bindings wait with them
        lost: dict[str, TopologyError] = {}  # exchanges refused otherwise: made again as another type, say
        for spec in list(self._exchanges.values()):
            try:
                await self._declare_exchange_on(spec)
            except TopologyError as exc:
                refused.append((spec, exc))
                if access_refused(exc):
                    held[spec.name] = exc
                elif _made_otherwise(exc):
                    lost[spec.name] = exc
        failed_queues: dict[Queue, TopologyError] = {}
        for queue in list(self._queues):
            try:
                await self._declare_queue_on(queue)
            except TopologyError as exc:
                refused.append((queue, exc))
                failed_queues[queue] = exc
        for binding in list(self._bindings):
            if binding.queue in failed_queues:
                continue  # goes with its queue
            if binding.exchange.name in held:
                # Not tried: while its exchange is refused access the bind is a 404, which would forget it (and stop
                # its consumer) for good; it waits with the exchange instead.
                refused.append((binding, held[binding.exchange.name]))
                failed_queues.setdefault(binding.queue, held[binding.exchange.name])
                continue
            if binding.exchange.name in lost:
                # Not tried either: on an exchange someone made again as another type (or otherwise) the bind would
                # be taken, and route what the subscription never asked for, or nothing; its consumer stops.
                refused.append((binding, lost[binding.exchange.name]))
                failed_queues.setdefault(binding.queue, lost[binding.exchange.name])
                continue
            try:
                await self._bind_again(binding)
            except TopologyError as exc:
                refused.append((binding, exc))
                failed_queues.setdefault(binding.queue, exc)
        return refused, failed_queues

    async def _declare_with_bindings(self, queue: Queue) -> None:
        """Declare ``queue`` again with its bindings, and first the exchanges they bind to that are ours to declare:
        after a queue was deleted under its consumer, or its vhost deleted and made again, those may be gone too (a
        bind to a missing exchange is a 404, which stops the consumer for good). A server-named queue of this
        connection's that is still there is kept, not replaced by a new one at each attempt."""
        bindings = [b for b in self._bindings if b.queue == queue]
        for exchange in {b.exchange.name: b.exchange for b in bindings}.values():
            if self._exchanges.get(exchange.name) == exchange:
                await self._declare_exchange_on(exchange)
        if not (queue.server_named and await self._live_queue_there(queue)):
            await self._declare_queue_on(queue)
        for binding in bindings:
            await self._bind_again(binding)

    async def _live_queue_there(self, queue: Queue) -> bool:
        """Whether the queue the broker named for server-named ``queue`` on this connection still exists."""
        name = self._queues.get(queue)
        if not name:
            return False
        return await self._exists(name) is True

    async def _exists(self, name: str) -> bool | None:
        """Whether queue ``name`` exists, by a passive declare on the topology channel (which a 404 closes; the next
        use opens another), without waiting for the Broker to be connected (a reconnect asks before it declares
        anything again): False on a 404, None when the broker refuses otherwise (403: unknown). A lost connection
        raises."""
        try:
            async with self._topology() as channel:
                with map_exceptions(kind="queue", name=name):
                    await channel.queue_declare(name, passive=True)
        except TopologyError as exc:
            if queue_unavailable(exc):
                return None  # there, but its node cannot serve it now (see queue_unavailable)
            return False if caused_by(exc, ChannelNotFoundEntity) is not None else None
        return True

    def _waits_out(self, spec: Exchange | Queue | Binding, exc: BaseException) -> bool:
        """Whether a refusal of ``spec`` at a reconnect is waited out (the spec kept, its consumers registered and
        not attached, both tried again with the backoff) rather than given up: a refusal of access (403), a
        named exclusive queue of this Broker's that the broker still holds for another connection (405, see
        :meth:`_locked`), or a durable queue the broker has but cannot serve yet (404 "home node ... is down or
        inaccessible", see :func:`~amqpkit.errors.queue_unavailable`: a node's streams just after it started)."""
        return access_refused(exc) or self._locked(spec, exc) or queue_unavailable(exc)

    def _locked(self, spec: Exchange | Queue | Binding, exc: BaseException) -> bool:
        """Whether ``exc`` is the broker refusing a named exclusive queue this Broker declared (and remembers)
        because another connection holds it (405 RESOURCE_LOCKED). Most often that connection is this Broker's
        previous one: a dead link is noticed here after a heartbeat and a second, and by the broker only after
        two or three heartbeats, so the reconnect re-declares the queue while the broker still holds the old
        connection, and the queue with it, for a few seconds. It lets the queue go with that connection."""
        return (
            isinstance(spec, Queue)
            and spec.exclusive
            and not spec.server_named
            and spec in self._queues
            and caused_by(exc, ChannelLockedResource) is not None
        )

    def _keep_refused(self, spec: Exchange | Queue | Binding, exc: TopologyError) -> None:
        """A spec the broker refused access to (403, see :func:`~amqpkit.errors.access_refused`) at a reconnect,
        or a named exclusive queue another connection holds (405, :meth:`_locked`): not forgotten but kept, and
        declared again once the broker allows it (Consuming._retry_refused). Said once per refusal, not at each
        attempt."""
        before = self._access_refused.get(spec)
        self._access_refused[spec] = exc
        if isinstance(spec, Queue) and self._locked(spec, exc):
            self._say_locked(spec, exc, again=before is not None and self._locked(spec, before))
            return
        if same_refusal(before, exc):
            return
        if queue_unavailable(exc):
            log.warning("could not restore %s after the reconnect: %s; the broker has it but cannot serve it yet "
                        "(its node just started, or is down): declared again with the reconnect policy's backoff",
                        _describe(spec), exc)  # fmt: skip
        else:
            log.error("could not restore %s after the reconnect: %s; kept, and declared again until the broker "
                      "allows it", _describe(spec), exc)  # fmt: skip

    def _say_locked(self, queue: Queue, exc: TopologyError, *, again: bool) -> None:
        """A named exclusive queue held by another connection (:meth:`_locked`), said once when it starts (INFO:
        most often the broker is about to drop this Broker's previous connection), and once more, as a WARNING,
        if it still is past the time the broker takes to drop a dead connection (:func:`channel_cap_hold`: three
        heartbeats and 10 s): then a live connection holds it. It is waited out either way (see RELIABILITY.md,
        "A named exclusive queue held by another connection")."""
        now = time.monotonic()
        for stale in [q for q in self._locked_since if q not in self._access_refused]:
            del self._locked_since[stale]
        since, warned = self._locked_since.get(queue, (now, False)) if again else (now, False)
        n = sum(1 for c in self._consumers.values() if c.queue == queue and not c.cancelled)
        readers = f"{n} consumer{'s' if n != 1 else ''} of it" if n else ""
        if not again:
            log.info("could not restore %s after the reconnect: %s; another connection holds it, most likely this "
                     "Broker's previous one, which the broker drops within a few heartbeats: declared again with the "
                     "reconnect policy's backoff%s", _describe(queue), exc,
                     f", and the {readers} attached then" if n else "")  # fmt: skip
        elif not warned and now - since >= channel_cap_hold(self.settings.heartbeat):
            heartbeat = self.settings.heartbeat
            log.warning("%s is still held by another connection %.0f s after the reconnect, longer than the broker "
                        "takes to drop a dead connection (%s): %s holds it exclusively, or a queue of that name that "
                        "is not exclusive was declared meanwhile (the broker's 405 says either). %sit is declared "
                        "again until the broker allows it", _describe(queue), now - since,
                        f"heartbeat {heartbeat} s" if heartbeat else "heartbeats off",
                        "a live connection" if heartbeat else "most likely a live connection",
                        f"The {readers} {'stay' if n != 1 else 'stays'} not attached (Consumer.error says why); "
                        if n else "")  # fmt: skip
            warned = True
        self._locked_since[queue] = (since, warned)

    async def _declare_spec_on(self, spec: Exchange | Queue | Binding) -> None:
        if isinstance(spec, Exchange):
            await self._declare_exchange_on(spec)
        elif isinstance(spec, Queue):
            await self._declare_queue_on(spec)
        else:
            await self._bind_again(spec)

    def _forget_refused(self, spec: Exchange | Queue | Binding, exc: TopologyError) -> None:
        log.error("could not restore %s after the reconnect (forgotten): %s", _describe(spec), exc)
        self._forget_with(spec, exc)

    def _forget_with(self, spec: Exchange | Queue | Binding, exc: TopologyError) -> None:
        """Forget ``spec``, and tell the ``on_topology_error`` callbacks why."""
        self.forget(spec)
        for callback in list(self._on_topology_error):
            try:
                callback(spec, exc)
            except Exception:
                log.exception("topology error callback failed")


def _made_otherwise(exc: TopologyError) -> bool:
    """Whether ``exc`` is the broker's 406 for a declare of something that is there otherwise (another type, other
    arguments): :func:`~amqpkit.errors.map_exceptions` names the argument that differs."""
    return exc.argument is not None


def _no_exchange(exc: BaseException) -> bool:
    """Whether ``exc`` is the broker's 404 for a missing exchange (a bind's 404 may be its queue's too)."""
    return not_found_saying(exc, "no exchange")


def _describe(spec: Exchange | Queue | Binding) -> str:
    if isinstance(spec, Exchange):
        return f"exchange {spec.name!r}"
    if isinstance(spec, Queue):
        return f"queue {spec.name or '(server-named)'!r}"
    return f"binding {spec.exchange.name!r} -> {spec.queue.name or '(server-named)'!r} ({spec.routing_key!r})"
