"""Fault runs for the transactional outbox and the inbox, with a ledger by message id.

    .venv/bin/python scripts/outbox_faults.py outbox --backend sqlite        # one outbox run
    .venv/bin/python scripts/outbox_faults.py inbox --backend postgresql     # one inbox run
    .venv/bin/python scripts/outbox_faults.py all --runs 3                   # both, both backends, 3 times each

**Outbox**: 10,000 business transactions (a row in a business table and an
event in the outbox, in one transaction), 10 % of them rolled back. The relay
runs as its own process (``python -m amqpkit.outbox relay``) and is SIGKILLed
at random moments 5 times (started again each time), and the broker is
restarted once (``stop_app``/``start_app``). A consumer in this script records
every delivery. The ledger: every committed transaction's event arrived at
least once (lost 0), none from a rolled-back one (phantoms 0), duplicates
counted (same message ids: an id is the transaction's), and per ordering key
the first arrivals in commit order.

**Inbox**: increments published to a work queue (2 % of them published twice
on purpose, as an upstream resend would); a consumer process (a Worker with an
inbox handler that adds to a counter table) SIGKILLed 5 times mid-stream. The
counter must equal the sum of the distinct increments exactly; duplicates
absorbed are counted from the consumers' journals.

Both run on a RabbitMQ node this script starts itself on other ports (own
name, ports, folders and cookie; see scripts/soak/node.py), never the
machine's default node, and stopped at the end. PostgreSQL: POSTGRES_URL, else
postgresql://postgres@127.0.0.1:5432/test, in a schema of the run's own
(dropped at the end). SQLite: a file in the run's temp folder.

Ledgers are written as JSON (default docs/reliability/<kind>-<backend>-<n>.json).
Exit 0 when every ledger holds, 1 when one does not.
"""

# Table names in the SQL below are the run's own; values are parameters. A script, so blocking file calls are fine.
# ruff: noqa: S608, ASYNC230, ASYNC240

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak.node import OwnNode

from amqpkit import Broker, BrokerSettings, Delivery, Envelope, Queue, ReconnectPolicy
from amqpkit.outbox import Inbox, Outbox, PostgresStore, Store, open_store

ROOT = Path(__file__).resolve().parents[1]
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def now() -> float:
    return time.monotonic()


def log(text: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- database


class Db:
    """The run's database: a SQLite file, or a schema of its own on PostgreSQL."""

    def __init__(self, backend: str, workdir: Path) -> None:
        self.backend = backend
        if backend == "sqlite":
            self.url = f"sqlite:///{workdir / 'app.db'}"
            self.options: dict[str, Any] = {}
            self.schema = None
            self.relay_args: list[str] = []
        else:
            self.url = os.environ.get("POSTGRES_URL") or LOCAL_POSTGRES
            self.schema = f"faults_{uuid.uuid4().hex[:10]}"
            self.options = {"schema": self.schema}
            self.relay_args = ["--schema", self.schema]

    def table(self, name: str) -> str:
        return f'"{self.schema}".{name}' if self.schema else name

    def param(self, n: int) -> str:
        return f"${n}" if self.schema else "?"

    async def open(self) -> Store:
        return await open_store(self.url, **self.options)

    async def execute(self, tx: Any, sql: str, *args: Any) -> None:
        if self.schema:
            await tx.execute(sql, *args)
        else:
            await tx.execute(sql, args)

    async def fetch(self, store: Store, sql: str) -> list[tuple[Any, ...]]:
        async with store.transaction() as tx:
            if self.schema:
                return [tuple(r) for r in await tx.fetch(sql)]
            cursor = await tx.execute(sql)
            return [tuple(r) for r in await cursor.fetchall()]

    async def drop(self, store: Store) -> None:
        if self.schema and isinstance(store, PostgresStore):
            async with store.transaction() as tx:
                await tx.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    async def version(self, store: Store) -> str:
        if self.schema:
            rows = await self.fetch(store, "SELECT current_setting('server_version')")
            return f"PostgreSQL {rows[0][0]}"
        return f"SQLite {sqlite3.sqlite_version}"


# ---------------------------------------------------------------- processes


class Supervised:
    """A child process (own process group) that can be SIGKILLed and started again; logs to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logfile: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.logfile = logfile
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.starts = 0
        self.unexpected_exits: list[int] = []
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        out = open(self.logfile, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        finally:
            out.close()
        self.started_at = now()
        self.starts += 1
        self._watch = asyncio.ensure_future(self._watch_exit(self.proc))

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._stopping or proc is not self.proc or code == -signal.SIGKILL:
            return
        self.unexpected_exits.append(code)
        log(f"{self.name} exited with {code}; starting it again")
        await asyncio.sleep(1)
        if not self._stopping and proc is self.proc:
            await self.start()

    async def kill(self) -> float:
        """SIGKILL the process group; returns how long it had been up."""
        assert self.proc is not None
        up = now() - self.started_at
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        return up

    async def stop(self, grace: float = 20) -> int | None:
        self._stopping = True
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        return proc.returncode


async def kill_schedule(
    rng: random.Random, target: Supervised, kills: int, window: float, started: float, restart_gap: float = 0.5
) -> list[dict[str, Any]]:
    """SIGKILL ``target`` ``kills`` times at random moments within ``window`` seconds; start it again each time."""
    moments = sorted(rng.uniform(0.05 * window, 0.95 * window) for _ in range(kills))
    records = []
    for at in moments:
        await asyncio.sleep(max(0.0, started + at - now()))
        up = await target.kill()
        records.append({"at_s": round(now() - started, 2), "had_run_s": round(up, 2)})
        log(f"SIGKILLed {target.name} at {now() - started:.1f} s (up {up:.1f} s)")
        await asyncio.sleep(rng.uniform(0.1, restart_gap))
        await target.start()
    return records


def broker_settings(url: str) -> BrokerSettings:
    return BrokerSettings(
        url=url, heartbeat=5, publish_timeout=60,
        reconnect=ReconnectPolicy(initial_delay=0.1, max_delay=2.0, jitter=0.2, connect_attempts=60),
    )  # fmt: skip


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "shared": "2 cores shared with the broker nodes, PostgreSQL and other developers' test runs",
    }


# ---------------------------------------------------------------- outbox run


async def outbox_run(args: argparse.Namespace, node: OwnNode, backend: str, number: int) -> dict[str, Any]:
    rng = random.Random(args.seed + number if args.seed is not None else None)
    workdir = Path(tempfile.mkdtemp(prefix=f"outbox-{backend}-", dir=args.workdir))
    db = Db(backend, workdir)
    run = uuid.uuid4().hex[:8]
    store = await db.open()
    business = db.table("business")
    async with store.transaction() as tx:
        await tx.execute(
            f"CREATE TABLE IF NOT EXISTS {business} (id INTEGER PRIMARY KEY, account TEXT, amount INTEGER)"
        )
    queue = Queue(f"outbox-faults-{run}", durable=True)
    outbox = Outbox(store)
    arrivals: Counter[str] = Counter()
    redelivered = 0
    first_seq: dict[str, list[int]] = defaultdict(list)
    bad_bodies = 0

    async def on_event(delivery: Delivery[bytes]) -> None:
        nonlocal redelivered, bad_bodies
        mid = delivery.message_id or ""
        arrivals[mid] += 1
        if delivery.redelivered:
            redelivered += 1
        if arrivals[mid] == 1:
            try:
                body = json.loads(delivery.body)
                if f"{run}-tx-{body['seq']}" != mid:
                    bad_bodies += 1
                first_seq[body["account"]].append(int(body["seq"]))
            except (ValueError, KeyError, TypeError):
                bad_bodies += 1
        await delivery.ack()

    env = {**os.environ, "AMQP_URL": node.url}
    relay = Supervised(
        "relay",
        [sys.executable, "-m", "amqpkit.outbox", "relay", "--db", db.url, *db.relay_args, "--poll-interval", "0.2"],
        env,
        workdir / "relay.log",
    )
    committed: set[int] = set()
    rolled_back: set[int] = set()
    result: dict[str, Any] = {"kind": "outbox", "backend": backend, "run": number}
    async with Broker(broker_settings(node.url)) as broker:
        await broker.declare_queue(queue)
        consumer = await broker.consume(queue, on_event, prefetch=500)
        await relay.start()
        started = now()
        window = args.transactions / args.rate

        async def produce() -> None:
            for i in range(args.transactions):
                target = started + i / args.rate
                if target > now():
                    await asyncio.sleep(target - now())
                account = f"acct-{i % args.keys}"
                roll_back = rng.random() < args.rollback
                body = {"seq": i, "account": account, "amount": 1 + i % 97}
                try:
                    async with store.transaction() as tx:
                        await db.execute(
                            tx, f"INSERT INTO {business} (id, account, amount) VALUES ({db.param(1)}, "
                            f"{db.param(2)}, {db.param(3)})", i, account, body["amount"],
                        )  # fmt: skip
                        await outbox.add(tx, body, routing_key=queue.name, ordering_key=account,
                                         message_id=f"{run}-tx-{i}")  # fmt: skip
                        if roll_back:
                            raise _RollBack
                    committed.add(i)
                except _RollBack:
                    rolled_back.add(i)

        async def restart_broker() -> dict[str, Any]:
            at = rng.uniform(0.2 * window, 0.8 * window)
            await asyncio.sleep(max(0.0, started + at - now()))
            began = now()
            log(f"restarting the broker node at {began - started:.1f} s")
            try:
                await node.ctl.run("stop_app", timeout=120)
            finally:
                await node.ctl.run("start_app", timeout=180)
            return {"at_s": round(began - started, 2), "down_s": round(now() - began, 2)}

        kills_task = asyncio.ensure_future(kill_schedule(rng, relay, args.kills, window, started))
        restart_task = asyncio.ensure_future(restart_broker())
        await produce()
        produced_s = now() - started
        kills = await kills_task
        restart = await restart_task
        log(f"{len(committed)} committed, {len(rolled_back)} rolled back in {produced_s:.1f} s; draining")
        deadline = now() + args.drain_timeout
        while now() < deadline:
            counts = await store.counts()
            if counts["pending"] == 0 and all(f"{run}-tx-{i}" in arrivals for i in committed):
                break
            await asyncio.sleep(0.5)
        drained_s = now() - started
        relay_code = await relay.stop()
        await asyncio.sleep(1)  # let deliveries still on the wire arrive (counted as duplicates if any)
        await consumer.cancel()
        in_db = {int(r[0]) for r in await db.fetch(store, f"SELECT id FROM {business}")}
        counts = await store.counts()
        result["broker"] = " ".join(broker.server_product)
        await broker.delete_queue(queue.name)
    committed_ids = {f"{run}-tx-{i}" for i in in_db}
    rolled_ids = {f"{run}-tx-{i}" for i in rolled_back}
    lost = sorted(committed_ids - set(arrivals))
    phantoms = sorted(set(arrivals) & rolled_ids)
    unknown = sorted(set(arrivals) - committed_ids - rolled_ids)
    duplicates = sum(n - 1 for n in arrivals.values())
    order_violations = sum(1 for seqs in first_seq.values() for a, b in itertools.pairwise(seqs) if b < a)
    result.update(
        {
            "transactions": args.transactions,
            "committed": len(in_db),
            "committed_matches_producer": in_db == committed,
            "rolled_back": len(rolled_back),
            "published_unique": len(arrivals),
            "deliveries": sum(arrivals.values()),
            "lost": len(lost),
            "lost_ids": lost[:20],
            "phantoms_from_rolled_back": len(phantoms),
            "unknown_ids": len(unknown),
            "duplicates": duplicates,
            "duplicates_redelivered_by_broker": redelivered,
            # An id is the transaction's own: a duplicate is, by construction, the same message id.
            "duplicates_same_message_id": True,
            "bodies_not_matching_their_id": bad_bodies,
            "ordering_keys": args.keys,
            "order_violations_first_arrivals": order_violations,
            "outbox_rows_left": counts,
            "relay_kills": kills,
            "relay_starts": relay.starts,
            "relay_unexpected_exits": relay.unexpected_exits,
            "relay_final_exit_code": relay_code,
            "broker_restart": restart,
            "produce_s": round(produced_s, 1),
            "all_published_s": round(drained_s, 1),
            "database": await db.version(store),
            "machine": machine(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    result["ok"] = (
        not lost and not phantoms and not unknown and bad_bodies == 0 and order_violations == 0
        and counts["pending"] == 0 and counts["failed"] == 0 and len(kills) == args.kills
    )  # fmt: skip
    await db.drop(store)
    await store.close()
    shutil.rmtree(workdir, ignore_errors=True)
    return result


class _RollBack(Exception):
    """The business rule said no: the transaction rolls back, its event with it."""


# ---------------------------------------------------------------- inbox run


async def inbox_consumer(args: argparse.Namespace) -> int:
    """The consumer process of the inbox run: a Worker whose handler adds increments to a counter."""
    from amqpkit import Worker, WorkQueue

    options = {"schema": args.schema} if args.schema else {}
    store = await open_store(args.db, **options)
    counter = f'"{args.schema}".counter' if args.schema else "counter"
    journal = os.open(args.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def duplicate(message_id: str) -> None:
        os.write(journal, f"D {message_id}\n".encode())

    inbox = Inbox(store, consumer="counter", on_duplicate=duplicate)

    async def apply(increment: dict[str, Any], tx: Any) -> None:
        if args.schema:
            await tx.execute(
                f"UPDATE {counter} SET total = total + $1, applied = applied + 1", int(increment["amount"])
            )
        else:
            await tx.execute(
                f"UPDATE {counter} SET total = total + ?, applied = applied + 1", (int(increment["amount"]),)
            )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with Broker(broker_settings(os.environ["AMQP_URL"])) as broker:
        worker = Worker(WorkQueue(broker, args.queue), inbox.handler(apply), concurrency=args.concurrency)
        async with worker:
            await stop.wait()
    os.write(journal, f"S processed={inbox.processed} duplicates={inbox.duplicates}\n".encode())
    os.close(journal)
    await store.close()
    return 0


async def inbox_run(args: argparse.Namespace, node: OwnNode, backend: str, number: int) -> dict[str, Any]:
    from amqpkit import WorkQueue

    rng = random.Random(args.seed + 1000 + number if args.seed is not None else None)
    workdir = Path(tempfile.mkdtemp(prefix=f"inbox-{backend}-", dir=args.workdir))
    db = Db(backend, workdir)
    run = uuid.uuid4().hex[:8]
    store = await db.open()
    counter = db.table("counter")
    async with store.transaction() as tx:
        await tx.execute(f"CREATE TABLE IF NOT EXISTS {counter} (total BIGINT NOT NULL, applied BIGINT NOT NULL)")
        await tx.execute(f"INSERT INTO {counter} VALUES (0, 0)")
    journal = workdir / "journal.txt"
    queue_name = f"inbox-faults-{run}"
    env = {**os.environ, "AMQP_URL": node.url}
    argv = [sys.executable, str(Path(__file__).resolve()), "inbox-consumer", "--db", db.url, "--queue", queue_name,
            "--journal", str(journal), "--concurrency", str(args.concurrency)]  # fmt: skip
    if db.schema:
        argv += ["--schema", db.schema]
    consumer = Supervised("consumer", argv, env, workdir / "consumer.log")
    result: dict[str, Any] = {"kind": "inbox", "backend": backend, "run": number}
    expected: dict[str, int] = {}
    resent = 0
    async with Broker(broker_settings(node.url)) as broker:
        work: WorkQueue[Any] = WorkQueue(broker, queue_name)
        await work.declare()
        await consumer.start()
        started = now()
        window = args.messages / args.rate

        async def produce() -> None:
            nonlocal resent
            sent: list[tuple[str, int]] = []
            for i in range(args.messages):
                target = started + i / args.rate
                if target > now():
                    await asyncio.sleep(target - now())
                mid, amount = f"{run}-inc-{i}", rng.randint(1, 100)
                expected[mid] = amount
                sent.append((mid, amount))
                await _publish_increment(broker, queue_name, mid, amount)
                if rng.random() < args.resend:
                    # An upstream resend: the same message (same id) once more, a little later.
                    old_mid, old_amount = rng.choice(sent[-200:])
                    await _publish_increment(broker, queue_name, old_mid, old_amount)
                    resent += 1

        kills_task = asyncio.ensure_future(kill_schedule(rng, consumer, args.kills, window, started, restart_gap=1.0))
        await produce()
        kills = await kills_task
        log(f"{len(expected)} increments published ({resent} resent); waiting for the consumer")
        deadline = now() + args.drain_timeout
        applied = total = 0
        while now() < deadline:
            (total, applied), = await db.fetch(store, f"SELECT total, applied FROM {counter}")  # fmt: skip
            ready, _ = await broker.queue_counts(queue_name)
            if applied >= len(expected) and ready == 0:
                break
            await asyncio.sleep(0.5)
        done_s = now() - started
        code = await consumer.stop()
        (total, applied), = await db.fetch(store, f"SELECT total, applied FROM {counter}")  # fmt: skip
        records = (await db.fetch(store, f"SELECT count(*) FROM {db.table('amqpkit_inbox')}"))[0][0]
        result["broker"] = " ".join(broker.server_product)
        await broker.delete_queue(queue_name)
        await broker.delete_queue(work.dlq_name)
    lines = journal.read_text().splitlines() if journal.exists() else []
    absorbed = sum(1 for line in lines if line.startswith("D "))
    expected_sum = sum(expected.values())
    result.update(
        {
            "messages": len(expected),
            "resent_by_producer": resent,
            "expected_sum": expected_sum,
            "counter_sum": int(total),
            "increments_applied": int(applied),
            "inbox_records": int(records),
            "duplicates_absorbed": absorbed,
            "consumer_kills": kills,
            "consumer_starts": consumer.starts,
            "consumer_unexpected_exits": consumer.unexpected_exits,
            "consumer_final_exit_code": code,
            "publish_s": round(window, 1),
            "all_applied_s": round(done_s, 1),
            "database": await db.version(store),
            "machine": machine(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    result["ok"] = (
        int(total) == expected_sum and int(applied) == len(expected) and int(records) == len(expected)
        and len(kills) == args.kills
    )  # fmt: skip
    await db.drop(store)
    await store.close()
    shutil.rmtree(workdir, ignore_errors=True)
    return result


async def _publish_increment(broker: Broker, queue: str, message_id: str, amount: int) -> None:
    body = json.dumps({"amount": amount}).encode()
    await broker.publish(Envelope(body, content_type="application/json", message_id=message_id),
                         routing_key=queue, mandatory=True)  # fmt: skip


# ---------------------------------------------------------------- main


def write_ledger(result: dict[str, Any], out: Path | None) -> Path:
    if out is None:
        out = ROOT / "docs" / "reliability" / f"{result['kind']}-{result['backend']}-{result['run']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def summary(r: dict[str, Any]) -> str:
    if r["kind"] == "outbox":
        return (
            f"outbox {r['backend']} #{r['run']}: {'OK' if r['ok'] else 'FAILED'} committed {r['committed']}, "
            f"rolled back {r['rolled_back']}, lost {r['lost']}, phantoms {r['phantoms_from_rolled_back']}, "
            f"duplicates {r['duplicates']} ({r['duplicates_redelivered_by_broker']} broker redeliveries), "
            f"order violations {r['order_violations_first_arrivals']}, relay kills {len(r['relay_kills'])}, "
            f"broker restart {r['broker_restart']['down_s']} s"
        )
    return (
        f"inbox {r['backend']} #{r['run']}: {'OK' if r['ok'] else 'FAILED'} sum {r['counter_sum']} of "
        f"{r['expected_sum']}, applied {r['increments_applied']} of {r['messages']}, duplicates absorbed "
        f"{r['duplicates_absorbed']} ({r['resent_by_producer']} resent on purpose), kills {len(r['consumer_kills'])}"
    )


async def main_async(args: argparse.Namespace) -> int:
    if args.command == "inbox-consumer":
        return await inbox_consumer(args)
    kinds = ["outbox", "inbox"] if args.command == "all" else [args.command]
    backends = [args.backend] if args.backend else ["sqlite", "postgresql"]
    runs = range(args.first, args.first + args.runs)
    base = Path(tempfile.mkdtemp(prefix="amqpkit-outbox-faults-"))
    args.workdir = str(base)
    node = OwnNode(base)
    ok = True
    try:
        log(f"starting a RabbitMQ node of our own on port {node.amqp_port}")
        await node.start()
        for number in runs:
            for kind in kinds:
                for backend in backends:
                    log(f"{kind} run {number} on {backend}")
                    run = outbox_run if kind == "outbox" else inbox_run
                    result = await run(args, node, backend, number)
                    result["node"] = node.describe()
                    path = write_ledger(result, Path(args.out) if args.out else None)
                    print(summary(result), flush=True)
                    log(f"ledger: {path}")
                    ok = ok and bool(result["ok"])
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/outbox_faults.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["outbox", "inbox", "all", "inbox-consumer"])
    p.add_argument("--backend", choices=["sqlite", "postgresql"], help="one backend (default: both)")
    p.add_argument("--runs", type=int, default=1, help="runs of each kind on each backend (default 1)")
    p.add_argument("--first", type=int, default=1, help="number of the first run (names the ledger file)")
    p.add_argument("--out", help="ledger file (default docs/reliability/<kind>-<backend>-<n>.json)")
    p.add_argument("--seed", type=int, help="random seed (default: a new one each run)")
    p.add_argument("--transactions", type=int, default=10_000)
    p.add_argument("--rollback", type=float, default=0.10, help="share of transactions rolled back")
    p.add_argument("--rate", type=float, default=150.0, help="transactions (or increments) per second")
    p.add_argument("--keys", type=int, default=50, help="ordering keys (accounts)")
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--messages", type=int, default=10_000, help="increments in the inbox run")
    p.add_argument("--resend", type=float, default=0.02, help="share of increments published twice on purpose")
    p.add_argument("--concurrency", type=int, default=16, help="the inbox consumer's tasks in flight")
    p.add_argument("--drain-timeout", type=float, default=300.0)
    # inbox-consumer only
    p.add_argument("--db")
    p.add_argument("--schema")
    p.add_argument("--queue")
    p.add_argument("--journal")
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the node too, as Ctrl-C does
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
