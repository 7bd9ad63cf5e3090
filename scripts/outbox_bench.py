"""Outbox and inbox benchmark: relay throughput and commit-to-publish latency beside direct confirmed publishing,
and the inbox's cost per message, on SQLite and PostgreSQL.

    .venv/bin/python scripts/outbox_bench.py                 # both backends, a RabbitMQ node of its own
    .venv/bin/python scripts/outbox_bench.py --url amqp://... --backend postgresql --repeats 5

Every figure is measured ``--repeats`` times and printed as median [min - max]:

- **throughput**: ``--messages`` persistent messages confirmed by the broker.
  Direct: ``--concurrency`` publishers, each awaiting ``Broker.publish`` (its
  confirm) before its next message.
  Relay: the same number of rows committed to the outbox beforehand (not
  timed), then one in-process relay drains them (timed from its start to the
  last row marked sent); with no ordering key, and with 100 keys.
- **latency**: one message at a time (``--latency-samples`` of them, paced at
  ``--latency-rate`` per second) to a consumer in this process. Direct: from
  the call to ``publish`` to the delivery. Outbox: from the commit's return to
  the delivery, with the relay idle in between (woken by NOTIFY on
  PostgreSQL, by the same store's commit on SQLite; poll interval 1 s).
- **inbox cost**: ``--inbox-messages`` increments applied one after the other,
  each in its own transaction, alternately without and with the inbox around
  it; the difference per message.

Prints a table and writes JSON (``--out``). The machine is shared: figures
move with its load, hence the spread.
"""

# Table names in the SQL below are the run's own; values are parameters.
# ruff: noqa: S608

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak.node import OwnNode

from amqpkit import Broker, BrokerSettings, Delivery, Envelope, Queue
from amqpkit.outbox import Inbox, Outbox, PostgresStore, Relay, Store, open_store

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def show(s: dict[str, float], unit: str, digits: int = 0) -> str:
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'])} [{f.format(s['min'])} - {f.format(s['max'])}] {unit}"


QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Bench:
    def __init__(self, args: argparse.Namespace, url: str, workdir: Path) -> None:
        self.args = args
        self.url = url
        self.workdir = workdir

    async def store(self, backend: str) -> tuple[Store, str | None]:
        if backend == "sqlite":
            path = self.workdir / f"bench-{uuid.uuid4().hex[:6]}.db"
            return await open_store(f"sqlite:///{path}", synchronous=self.args.sqlite_synchronous), None
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        return await open_store(os.environ.get("POSTGRES_URL") or LOCAL_POSTGRES, schema=schema), schema

    async def drop(self, store: Store, schema: str | None) -> None:
        if schema and isinstance(store, PostgresStore):
            async with store.transaction() as tx:
                await tx.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await store.close()

    async def fresh_queue(self, broker: Broker) -> Queue:
        queue = Queue(f"outbox-bench-{uuid.uuid4().hex[:8]}", durable=True)
        await broker.declare_queue(queue)
        return queue

    # ------------------------------------------------------------ throughput

    async def direct_throughput(self, broker: Broker) -> float:
        queue = await self.fresh_queue(broker)
        n = self.args.messages
        body = b"x" * self.args.size
        numbers = iter(range(n))

        async def publisher() -> None:
            # One of ``concurrency`` publishers, each waiting for its confirm before the next: a window.
            for i in numbers:
                await broker.publish(Envelope(body, message_id=f"d{i}"), routing_key=queue.name, mandatory=True)

        started = time.perf_counter()
        await asyncio.gather(*(publisher() for _ in range(self.args.concurrency)))
        elapsed = time.perf_counter() - started
        await broker.delete_queue(queue.name)
        return n / elapsed

    async def relay_throughput(self, broker: Broker, backend: str, keys: int) -> float:
        store, schema = await self.store(backend)
        queue = await self.fresh_queue(broker)
        outbox = Outbox(store)
        n = self.args.messages
        body = b"x" * self.args.size
        try:
            for start in range(0, n, 500):
                async with store.transaction() as tx:
                    for i in range(start, min(n, start + 500)):
                        key = f"k{i % keys}" if keys else None
                        await outbox.add(tx, body, routing_key=queue.name, ordering_key=key)
            relay = Relay(store, broker, batch_size=self.args.batch, poll_interval=0.05)
            started = time.perf_counter()
            while relay.sent < n:
                await relay.run_once()
            elapsed = time.perf_counter() - started
            assert (await store.counts())["pending"] == 0
        finally:
            await broker.delete_queue(queue.name)
            await self.drop(store, schema)
        return n / elapsed

    # ------------------------------------------------------------ latency

    async def latency(self, broker: Broker, backend: str | None) -> list[float]:
        """Seconds from the commit (outbox) or the publish call (direct) to the delivery, per message."""
        queue = await self.fresh_queue(broker)
        arrived: dict[str, float] = {}
        events: dict[str, asyncio.Event] = {}

        async def on_message(delivery: Delivery[bytes]) -> None:
            mid = delivery.message_id or ""
            arrived[mid] = time.perf_counter()
            await delivery.ack()
            if mid in events:
                events[mid].set()

        consumer = await broker.consume(queue, on_message, prefetch=100)
        samples: list[float] = []
        store: Store | None = None
        schema: str | None = None
        relay: Relay | None = None
        try:
            if backend is not None:
                store, schema = await self.store(backend)
                relay = Relay(store, broker, poll_interval=1.0, cleanup_interval=3600)
                relay.start()
                outbox = Outbox(store)
            for i in range(self.args.latency_samples + 20):
                mid = f"l{i}-{uuid.uuid4().hex[:6]}"
                events[mid] = asyncio.Event()
                if store is None:
                    began = time.perf_counter()
                    await broker.publish(Envelope(b"x" * self.args.size, message_id=mid), routing_key=queue.name)
                else:
                    async with store.transaction() as tx:
                        await outbox.add(tx, b"x" * self.args.size, routing_key=queue.name, message_id=mid)
                    began = time.perf_counter()
                await asyncio.wait_for(events[mid].wait(), 30)
                if i >= 20:  # the first ones warm up connections and caches
                    samples.append(arrived[mid] - began)
                await asyncio.sleep(1 / self.args.latency_rate)
        finally:
            if relay is not None:
                await relay.stop()
            await consumer.cancel()
            await broker.delete_queue(queue.name)
            if store is not None:
                await self.drop(store, schema)
        return samples

    # ------------------------------------------------------------ inbox

    async def inbox_cost(self, backend: str) -> tuple[float, float]:
        """Microseconds per message: a plain transaction applying an increment, and the same through the inbox."""
        store, schema = await self.store(backend)
        pg = isinstance(store, PostgresStore)
        counter = f'"{schema}".counter' if schema else "counter"
        sql = f"UPDATE {counter} SET total = total + {'$1' if pg else '?'}"
        try:
            async with store.transaction() as tx:
                await tx.execute(f"CREATE TABLE {counter} (total BIGINT NOT NULL)")
                await tx.execute(f"INSERT INTO {counter} VALUES (0)")

            async def apply(tx: Any, amount: int) -> None:
                if pg:
                    await tx.execute(sql, amount)
                else:
                    await tx.execute(sql, (amount,))

            async def handler(value: bytes, tx: Any) -> None:
                await apply(tx, 1)

            inbox = Inbox(store, consumer="bench")
            wrapped = inbox.handler(handler)
            m = self.args.inbox_messages
            deliveries = [
                Delivery(b"1", b"1", Envelope(b"1", message_id=f"m{i}-{uuid.uuid4().hex[:6]}").properties())
                for i in range(m)
            ]
            plain_s = inbox_s = 0.0
            for d in deliveries:  # interleaved, so both see the same disk and the same load
                started = time.perf_counter()
                async with store.transaction() as tx:
                    await apply(tx, 1)
                plain_s += time.perf_counter() - started
                started = time.perf_counter()
                await wrapped(d)
                inbox_s += time.perf_counter() - started
            plain, with_inbox = plain_s / m * 1e6, inbox_s / m * 1e6
        finally:
            await self.drop(store, schema)
        return plain, with_inbox


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="amqpkit-outbox-bench-"))
    node: OwnNode | None = None
    url = args.url
    try:
        if url is None:
            node = OwnNode(workdir)
            print(f"starting a RabbitMQ node of our own on port {node.amqp_port}", file=sys.stderr)
            await node.start()
            url = node.url
        bench = Bench(args, url, workdir)
        report: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "url"}}
        async with Broker(BrokerSettings(url=url, publish_timeout=60)) as broker:
            report["broker"] = " ".join(broker.server_product)
            report["broker_node"] = "own node (scripts/soak/node.py)" if node else "given by --url"
            report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "python": platform.python_version()}  # fmt: skip
            direct = [await bench.direct_throughput(broker) for _ in range(args.repeats)]
            report["direct_publish_per_s"] = spread(direct)
            print(f"direct confirmed publish: {show(spread(direct), 'msg/s')}", file=sys.stderr)
            direct_lat = [await bench.latency(broker, None) for _ in range(args.repeats)]
            report["direct_latency_ms"] = {
                q: spread([pct(s, v) * 1000 for s in direct_lat])
                for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
            }
            print(
                f"direct publish-to-delivery p50: {show(report['direct_latency_ms']['p50'], 'ms', 2)}", file=sys.stderr
            )
            for backend in args.backends:
                result: dict[str, Any] = {}
                for keys in (0, 100):
                    rates = [await bench.relay_throughput(broker, backend, keys) for _ in range(args.repeats)]
                    result[f"relay_per_s_{keys}_keys"] = spread(rates)
                    ratio = statistics.median(rates) / statistics.median(direct)
                    result[f"relay_vs_direct_{keys}_keys"] = round(ratio, 2)
                    print(f"{backend} relay, {keys} keys: {show(spread(rates), 'msg/s')} ({ratio:.2f}x direct)",
                          file=sys.stderr)  # fmt: skip
                lat = [await bench.latency(broker, backend) for _ in range(args.repeats)]
                result["commit_to_delivery_ms"] = {q: spread([pct(s, v) * 1000 for s in lat]) for q, v in QUANTILES}
                added = [pct(a, 0.5) * 1000 - pct(b, 0.5) * 1000 for a, b in zip(lat, direct_lat, strict=True)]
                result["added_p50_ms"] = spread(added)
                print(f"{backend} commit-to-delivery p50: {show(result['commit_to_delivery_ms']['p50'], 'ms', 2)}, "
                      f"added {show(spread(added), 'ms', 2)}", file=sys.stderr)  # fmt: skip
                costs = [await bench.inbox_cost(backend) for _ in range(args.repeats)]
                result["plain_tx_us"] = spread([c[0] for c in costs])
                result["inbox_tx_us"] = spread([c[1] for c in costs])
                result["inbox_added_us"] = spread([c[1] - c[0] for c in costs])
                print(f"{backend} inbox: plain {show(result['plain_tx_us'], 'us')}, with inbox "
                      f"{show(result['inbox_tx_us'], 'us')}, added {show(result['inbox_added_us'], 'us')} per message",
                      file=sys.stderr)  # fmt: skip
                report[backend] = result
        return report
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/outbox_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an existing broker (default: start a node of our own)")
    p.add_argument("--backend", dest="backends", action="append", choices=["sqlite", "postgresql"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=200, help="direct publishes in flight")
    p.add_argument("--batch", type=int, default=200, help="relay batch size")
    p.add_argument("--size", type=int, default=256, help="body bytes")
    p.add_argument("--latency-samples", type=int, default=200)
    p.add_argument("--latency-rate", type=float, default=50.0)
    p.add_argument("--inbox-messages", type=int, default=1000)
    p.add_argument("--sqlite-synchronous", default="FULL", choices=["FULL", "NORMAL"])
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    args.backends = args.backends or ["sqlite", "postgresql"]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the node too, as Ctrl-C does
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
