"""The soak from start to end: node, load, faults, drain, ledger, and everything stopped again.

``bash scripts/soak.sh --help`` lists the options. Exit code: 0 when the
ledger holds (nothing lost, nothing unaccounted for, every call within its
deadline, everything back after each fault), 1 when it does not, 2 when the
soak could not be set up, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import amqpkit
from amqpkit import AmqpkitError, ConnectError
from soak.faults import Faults, Health
from soak.ledger import pubsub_ledger, rpc_ledger, task_ledger
from soak.load import Brokers, Clock, Journal, PubSub, Rpc, Tasks, WorkerPool, paced, read_journals
from soak.node import Ctl, CtlError, OwnNode

ROOT = Path(__file__).resolve().parents[2]
R = TypeVar("R")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/soak.sh",
        description="Run amqpkit under a mixed load with a fault every ~30 s, then check the ledger by message id.",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long the load runs (default 10)")
    length.add_argument("--seconds", type=float, help="how long the load runs, in seconds")
    p.add_argument("--url", help="an existing broker instead of the soak's own node (needs --ctl-node)")
    p.add_argument("--ctl-node", help="the node rabbitmqctl drives for whole-broker faults, with --url")
    p.add_argument("--out", help="ledger file (default docs/reliability/soak-<UTC timestamp>.json)")
    p.add_argument("--pub-rate", type=float, default=50, help="pub/sub messages per second (default 50)")
    p.add_argument("--task-rate", type=float, default=10, help="tasks enqueued per second (default 10)")
    p.add_argument("--rpc-rate", type=float, default=50, help="RPC calls per second (default 50)")
    p.add_argument("--rpc-timeout", type=float, default=2.0, help="each call's deadline, seconds (default 2)")
    p.add_argument("--rpc-margin", type=float, default=1.0, help="how late past its deadline a call may end (1 s)")
    p.add_argument("--failure-rate", type=float, default=0.2, help="share of tasks that fail at least once (0.2)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--worker-concurrency", type=int, default=8)
    p.add_argument("--max-attempts", type=int, default=5, help="worker attempts before the DLQ (default 5)")
    p.add_argument("--retry-delay", type=float, default=2.0, help="first retry delay; doubles each time (2 s)")
    p.add_argument("--fault-every", type=float, help="seconds between faults (default 30, less for short runs)")
    p.add_argument(
        "--window-margin",
        type=float,
        default=2.0,
        help="seconds before a fault whose messages a deleted or disconnected queue may have held",
    )
    p.add_argument("--restore-limit", type=float, default=30.0, help="a subscription must be back within this")
    p.add_argument("--recovery-limit", type=float, default=60.0, help="everything must be back within this")
    p.add_argument("--drain-limit", type=float, default=240.0, help="at most this long after the load for the rest")
    p.add_argument(
        "--drain-idle",
        type=float,
        default=150.0,
        help="stop draining after this long without progress once the soak's queues are empty",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for the task plans")
    p.add_argument("--workdir", help="folder for the node, worker logs and journals (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (it is kept anyway when the soak fails)")
    args = p.parse_args(argv)
    args.duration = 60 * args.minutes if args.minutes is not None else (args.seconds or 600.0)
    if args.duration < 30:
        p.error("the soak needs at least 30 seconds")
    if args.url and not args.ctl_node:
        p.error("--url needs --ctl-node NODE (the node that rabbitmqctl stops, starts and cuts)")
    if args.fault_every is None:
        args.fault_every = min(30.0, (args.duration - 20) / 4)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")
    return args


def say(text: str) -> None:
    print(f"[soak] {text}", file=sys.stderr, flush=True)


class LogTally(logging.Handler):
    """Counts this process's amqpkit log records by level, and keeps the distinct warnings and errors."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.levels: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.levels[record.levelname] += 1
        if record.levelno >= logging.WARNING:
            import re

            text = re.sub(r"\b(amqpkit\.[0-9a-f]{16}|e\d{7}|t\d{6}|amq\.gen-\S+|\d[\d.]*)\b", "#", record.getMessage())
            self.kinds[f"{record.levelname} {record.name}: {text[:200]}"] += 1


def code_info() -> dict[str, Any]:
    source = Path(amqpkit.__file__).resolve().parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    in_repo = source == ROOT / "amqpkit"
    info: dict[str, Any] = {
        "version": amqpkit.__version__,
        "source": str(source),
        "repo_commit": git("rev-parse", "HEAD"),
    }
    info["source_is_this_checkout"] = in_repo
    if in_repo:
        info["uncommitted_changes_in_amqpkit"] = bool(git("status", "--porcelain", "--", "amqpkit"))
    marker = source.parent / "COMMIT"
    if not in_repo and marker.exists():
        info["source_commit"] = marker.read_text().strip()
    return info


async def queue_table(ctl: Ctl) -> list[dict[str, Any]]:
    try:
        out = await ctl.run(
            "list_queues",
            "name",
            "type",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "--formatter",
            "json",
            timeout=60,
        )
        rows: list[dict[str, Any]] = json.loads(out)
        return sorted(rows, key=lambda r: str(r.get("name")))
    except (CtlError, ValueError, TimeoutError) as exc:
        return [{"error": str(exc)[:300]}]


QUORUM_COUNTS = ("num_messages", "num_ready_messages", "num_checked_out", "num_discarded", "num_discard_checked_out")


def quorum_state_expression(vhost: str = "/") -> str:
    """An Erlang expression for ``rabbitmqctl eval``: each quorum queue of ``vhost`` with its state machine's
    counts, as one JSON line. ``num_discarded`` and ``num_discard_checked_out`` are the messages a queue holds
    for at-least-once dead-lettering (not yet taken by its target): list_queues shows them nowhere."""
    counts = ", ".join(QUORUM_COUNTS)
    quoted = vhost.replace("\\", "\\\\").replace('"', '\\"')
    return (
        'J = [#{<<"name">> => N, <<"counts">> => maps:with([' + counts + "], O)}"
        f' || Q <- rabbit_amqqueue:list(<<"{quoted}">>), amqqueue:get_type(Q) =:= rabbit_quorum_queue,'
        " {resource, _, queue, N} <- [amqqueue:get_name(Q)],"
        " {ok, {_, O}, _} <- [catch ra:local_query(amqqueue:get_pid(Q), fun rabbit_fifo:overview/1)]],"
        ' io:format("~s~n", [rabbit_json:encode(J)]).'
    )


def parse_quorum_state(out: str) -> dict[str, dict[str, int]]:
    """The JSON line of :func:`quorum_state_expression`'s output: {queue name: counts}."""
    line = next((x for x in out.splitlines() if x.startswith("[")), "[]")
    return {str(row["name"]): {k: int(v) for k, v in row["counts"].items()} for row in json.loads(line)}


async def quorum_state(ctl: Ctl, vhost: str = "/") -> dict[str, Any]:
    """{queue: counts} for the node's quorum queues, or {"error": ...} when it cannot be read."""
    try:
        return parse_quorum_state(await ctl.run("eval", quorum_state_expression(vhost), timeout=60))
    except (CtlError, ValueError, KeyError, TimeoutError) as exc:
        return {"error": str(exc)[:300]}


def held_for_dead_lettering(state: dict[str, Any]) -> dict[str, int]:
    """The soak's quorum queues that still hold messages for dead-lettering, with how many."""
    held = {}
    for name, counts in state.items():
        if name.startswith("soak.") and isinstance(counts, dict):
            n = counts.get("num_discarded", 0) + counts.get("num_discard_checked_out", 0)
            if n:
                held[name] = n
    return held


def describe_held(state: dict[str, Any]) -> list[str]:
    """What each soak queue holding messages for dead-lettering says about them, for the failure line."""
    out = []
    for name in sorted(held_for_dead_lettering(state)):
        waiting, taken = state[name].get("num_discarded", 0), state[name].get("num_discard_checked_out", 0)
        if not taken:
            out.append(f"{name}: {waiting} waiting and none taken by a dead-letter worker "
                       "(held on the broker's side: RELIABILITY.md, soak finding 4)")  # fmt: skip
        else:
            out.append(f"{name}: {taken} taken by its dead-letter worker and not yet accepted, {waiting} waiting")
    return out


async def soak(args: argparse.Namespace, workdir: Path, node: OwnNode | None, state: dict[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main_task = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and main_task is not None:
            main_task.cancel()
        state["interrupted"] = True
        stop.set()
        say("interrupted: ending the load, accounting what there is, stopping everything (again to hurry)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    tally = LogTally()
    logging.getLogger("amqpkit").addHandler(tally)
    logging.getLogger("amqpkit").setLevel(logging.INFO)
    file_log = logging.FileHandler(workdir / "soak.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(file_log)
    logging.getLogger().setLevel(logging.INFO)

    started_at = datetime.now(UTC)
    if node is not None:
        say(f"starting the soak's own RabbitMQ node {node.name} on 127.0.0.1:{node.amqp_port}")
        t = time.monotonic()
        await node.start()
        say(f"node up in {time.monotonic() - t:.1f} s")
        url, ctl, broker_info = node.url, node.ctl, node.describe()
    else:
        url, ctl = args.url, Ctl(args.ctl_node)
        broker_info = {"node": args.ctl_node, "own_node": False}

    clock = Clock()
    journal = Journal(clock)
    pubsub = PubSub(clock, journal, args.pub_rate)
    tasks = Tasks(clock, journal, args.task_rate, args.failure_rate, args.seed)
    rpc = Rpc(clock, args.rpc_rate, args.rpc_timeout, args.rpc_margin)
    workers = WorkerPool(
        url,
        workdir,
        journal,
        args.workers,
        concurrency=args.worker_concurrency,
        max_attempts=args.max_attempts,
        retry_delay=args.retry_delay,
    )
    state["workers"] = workers
    async with AsyncExitStack() as stack:
        brokers = Brokers(url, journal, stack)
        try:
            control = await brokers.open("control")
        except ConnectError as exc:
            say(f"cannot reach the broker: {exc}")
            return 2
        broker_info["product"] = " ".join(control.server_product)
        await pubsub.start(brokers, stack)
        await tasks.start(brokers)
        await rpc.start(brokers, stack)
        await workers.start()
        stack.push_async_callback(workers.stop)
        health = Health(dict(brokers.all), control, pubsub, rpc, workers)
        faults = Faults(
            ctl, clock, journal, pubsub, workers, health, interval=args.fault_every, recovery_limit=args.recovery_limit
        )

        clock.reset()
        journal.events.clear()
        duration = args.duration
        say(
            f"load for {duration:g} s: pub/sub {args.pub_rate:g}/s to 3 subscribers, tasks {args.task_rate:g}/s "
            f"({args.failure_rate:.0%} failing), RPC {args.rpc_rate:g}/s; a fault every {args.fault_every:g} s"
        )
        faults_over = asyncio.Event()

        def load_over() -> bool:
            return stop.is_set() or (clock.now() >= duration and faults_over.is_set())

        async def run_faults() -> None:
            try:
                await faults.run(lambda: stop.is_set(), last_start=duration - 20)
            finally:
                faults_over.set()

        async def progress() -> None:
            next_at = 15.0
            while not load_over():
                await asyncio.sleep(1)
                if clock.now() >= next_at:
                    next_at += 15
                    confirmed = sum(1 for s in pubsub.sent if s.confirmed)
                    subs = " ".join(f"{n} {len(a)}" for n, a in pubsub.arrivals.items())
                    lines = await asyncio.to_thread(read_journals, workdir)
                    done = len({x["id"] for x in lines if x.get("outcome") == "done"})
                    ok = sum(1 for c in rpc.calls if c.outcome == "ok")
                    say(
                        f"t={clock.now():5.0f}s  load {os.getloadavg()[0]:.1f}  "
                        f"published {confirmed}/{len(pubsub.sent)} ({subs})  "
                        f"tasks {len(tasks.sent)} done {done}  rpc ok {ok}/{len(rpc.calls)}  faults {len(faults.done)}"
                    )

        lag: list[float] = []
        stalls: list[tuple[float, float]] = []  # (when, how late) for wake-ups over 50 ms late
        loads: list[float] = []

        async def loop_lag() -> None:
            while not load_over():
                t = time.monotonic()
                await asyncio.sleep(0.1)
                late = time.monotonic() - t - 0.1
                lag.append(late)
                if late > 0.05:
                    stalls.append((clock.now(), late))
                if len(lag) % 50 == 0:
                    loads.append(os.getloadavg()[0])

        await asyncio.gather(
            paced(args.pub_rate, load_over, clock, pubsub.fire),
            paced(args.task_rate, load_over, clock, tasks.fire),
            paced(args.rpc_rate, load_over, clock, rpc.fire),
            run_faults(),
            progress(),
            loop_lag(),
        )
        load_s = clock.now()
        say(f"load over at t={load_s:.0f} s; waiting for what is in flight")
        await asyncio.gather(pubsub.finish(40), tasks.finish(40), rpc.finish())

        # Drain: until every subscriber has every message it must get and every task is accounted for.
        drain_limit = 10.0 if stop.is_set() else args.drain_limit
        drain_end = clock.now() + drain_limit
        kw = {"margin_before": args.window_margin, "restore_limit": args.restore_limit, "reference": "sub-1"}
        letters: list[dict[str, Any]] = []
        idle_since = clock.now()
        last_state: tuple[int, int] = (-1, -1)
        while True:
            with contextlib.suppress(AmqpkitError, TimeoutError):
                letters = await asyncio.wait_for(tasks.dead_letters(), 30)
            ps = await off_loop(pubsub_ledger, list(pubsub.sent), snapshot(pubsub.arrivals), list(pubsub.windows), **kw)
            ts = await off_loop(tasks_now, list(tasks.sent), workdir, letters, clock.wall0)
            now_state = (sum(s["lost"] for s in ps["subscribers"].values()), ts["unaccounted"])
            if now_state == (0, 0) or clock.now() >= drain_end:
                break
            if now_state != last_state:
                last_state, idle_since = now_state, clock.now()
            elif clock.now() - idle_since > args.drain_idle and not await _anything_left(ctl):
                # Nothing changed for a long while and nothing is left in the soak's queues: it is not coming.
                # (Long, because a quorum queue holds messages it could not dead-letter yet out of its counts.)
                break
            await asyncio.sleep(2)
        drain_s = clock.now() - load_s
        say(f"drained in {drain_s:.0f} s")
        queues = await queue_table(ctl)
        quorum = await quorum_state(ctl)

        pubsub_part = await off_loop(
            pubsub_ledger, list(pubsub.sent), snapshot(pubsub.arrivals), list(pubsub.windows), **kw
        )
        task_part = await off_loop(tasks_now, list(tasks.sent), workdir, letters, clock.wall0)
        rpc_part = await off_loop(rpc_ledger, list(rpc.calls), margin=args.rpc_margin, stalls=list(stalls))
        failures = pubsub_part.pop("failures") + task_part.pop("failures") + rpc_part.pop("failures")
        held = held_for_dead_lettering(quorum)
        task_part["held_for_dead_lettering_at_end"] = held
        if held:
            failures.append(
                f"quorum queues still hold messages for dead-lettering at the end: {'; '.join(describe_held(quorum))}"
            )
        if node is not None:
            deleted = [
                {"queue": q, "t_s": clock.of_wall(t)}
                for t, q in node.quorum_queues_deleted()
                if q.startswith("soak.tasks.retry.") and t >= clock.wall0
            ]
            task_part["delay_queues_deleted_by_the_node"] = deleted
            stuck = [{"queue": q, "t_s": clock.of_wall(t)} for t, q in node.dead_letters_stuck() if t >= clock.wall0]
            task_part["dead_lettering_stuck_in"] = stuck
            if stuck and task_part["unaccounted"]:
                failures.append(
                    f"work queue: the node could not forward dead letters (expired retries) from {len(stuck)} delay "
                    f"queues, on recovery after a restart (first: {stuck[0]['queue']} at t={stuck[0]['t_s']:.0f} s); "
                    "such a retry stays in its delay queue: see tasks.dead_lettering_stuck_in"
                )
            stranded = [u for u in task_part["unaccounted_sample"] if (u["last_seen"] or {}).get("outcome") == "fail"]
            if stranded and deleted:
                failures.append(
                    f"work queue: of the unaccounted tasks shown, {len(stranded)} were last seen failing (a retry "
                    f"pending), and the node deleted {len(deleted)} delay queues during the run that the soak did "
                    f"not delete (first: {deleted[0]['queue']} at t={deleted[0]['t_s']:.0f} s): see "
                    "tasks.delay_queues_deleted_by_the_node"
                )
        for f in faults.done:
            if "error" in f:
                failures.append(f"fault {f['n']} ({f['kind']}) at t={f['t']:.0f} s could not be made: {f['error']}")
            if f.get("not_back"):
                failures.append(
                    f"fault {f['n']} ({f['kind']}) at t={f['t']:.0f} s: not everything was back within "
                    f"{args.recovery_limit:g} s: {'; '.join(f['not_back'])}"
                )
        for e in workers.unexpected_exits:
            failures.append(f"worker process {e['pid']} exited unbidden with code {e['code']}: {e['last_lines'][-1:]}")
        for g in pubsub.gave_up:
            failures.append(f"subscriber gave up: {g}")
        for label, most in health.most_consumers.items():
            want = args.workers if label == "workers" else 1
            if most > want:
                failures.append(f"{label}: {most} consumers seen at once on its queue (want {want}): attached twice")
        if state.get("interrupted"):
            failures.append("interrupted before the end")
        pubsub_part["not_sent_backpressure"] = pubsub.not_sent_backpressure
        pubsub_part["publish_error_samples"] = pubsub.errors.samples
        task_part["not_sent_backpressure"] = tasks.not_sent_backpressure
        task_part["enqueue_error_samples"] = tasks.errors.samples
        rpc_part["requests_served_twice"] = rpc.served_twice()
        rpc_part["error_samples"] = rpc.errors.samples
        for part, samples in (("pub/sub", pubsub.errors), ("work queue", tasks.errors), ("rpc", rpc.errors)):
            for outcome, kept in samples.samples.items():
                if outcome.startswith("untyped:"):
                    first = kept[0]
                    failures.append(
                        f"{part}: not an amqpkit error: {first['error']} at t={first['t_s']:.0f} s, "
                        f"from {' <- '.join(reversed(first.get('where', [])[-3:]))}"
                    )
        ordered_lag = sorted(lag) or [0.0]
        ledger = {
            "soak": {
                "started": started_at.isoformat(timespec="seconds"),
                "load_s": round(load_s, 1),
                "drain_s": round(drain_s, 1),
                "interrupted": bool(state.get("interrupted")),
                "amqpkit": code_info(),
                "broker": broker_info,
                "params": {k: v for k, v in vars(args).items() if k not in ("url", "workdir", "out", "keep")},
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
                "machine_load_1min": {
                    "max": max(loads, default=0.0),
                    "mean": round(sum(loads) / max(1, len(loads)), 2),
                    "cpus": os.cpu_count(),
                },
                "event_loop_stalls_over_1s": [{"t_s": round(t, 1), "s": round(s, 2)} for t, s in stalls if s > 1],
                "event_loop_lag_ms": {
                    "p99": round(ordered_lag[int(0.99 * (len(ordered_lag) - 1))] * 1000, 1),
                    "max": round(ordered_lag[-1] * 1000, 1),
                },
            },
            "verdict": {"passed": not failures, "failures": failures},
            "pubsub": pubsub_part,
            "tasks": task_part,
            "rpc": rpc_part,
            "faults": faults.done,
            "most_consumers_seen": health.most_consumers,
            "events": journal.events,
            "worker_logs": workers.error_lines(),
            "worker_exits_unbidden": workers.unexpected_exits,
            "soak_process_log": {
                "levels": dict(tally.levels),
                "warnings_and_errors": [{"line": k, "times": n} for k, n in tally.kinds.most_common(20)],
            },
            "queues_at_end": queues,
            "quorum_queues_at_end": quorum,
        }
        state["ledger"] = ledger
        # The raw records, so the accounting can be done again (or better) from the same run.
        raw = {
            "wall0": clock.wall0,
            "published": [vars(x) for x in pubsub.sent],
            "arrivals": pubsub.arrivals,
            "windows": [vars(w) for w in pubsub.windows],
            "tasks": [vars(x) for x in tasks.sent],
            "dead_letters": letters,
            "calls": [vars(c) for c in rpc.calls],
        }
        (workdir / "records.json").write_text(json.dumps(raw, default=str))
        if state.get("interrupted"):
            return 130
        return 0 if not failures else 1


def snapshot(arrivals: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    """A copy the subscribers' handlers do not add to while the ledger reads it in a thread."""
    return {name: {k: list(v) for k, v in got.items()} for name, got in arrivals.items()}


def tasks_now(sent: list[Any], folder: Path, letters: list[dict[str, Any]], wall0: float) -> dict[str, Any]:
    return task_ledger(sent, read_journals(folder), letters, wall0=wall0)


async def off_loop(fn: Callable[..., R], *args: Any, **kw: Any) -> R:
    """Run the accounting in a thread: on a starved machine it takes seconds, and the soak's
    connections (subscribers, heartbeats) must keep running meanwhile."""
    return await asyncio.to_thread(fn, *args, **kw)


async def _anything_left(ctl: Ctl) -> bool:
    """Does any of the soak's queues (the DLQ aside) still hold messages, dead-letters in waiting included?"""
    rows = await queue_table(ctl)
    if rows and "error" in rows[0]:
        return True
    quorum = await quorum_state(ctl)
    if "error" in quorum or held_for_dead_lettering(quorum):
        return True
    for row in rows:
        name = str(row.get("name", ""))
        held = int(row.get("messages_ready") or 0) + int(row.get("messages_unacknowledged") or 0)
        if name.startswith("soak.") and not name.endswith(".dlq") and held:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # A work folder made for this run (here, or by scripts/soak.sh) is removed after a passing run.
    made_workdir = args.workdir is None or os.environ.get("SOAK_WORKDIR_MADE") == args.workdir
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="amqpkit-soak."))
    workdir.mkdir(parents=True, exist_ok=True)
    node: OwnNode | None = None
    state: dict[str, Any] = {}
    code = 2
    try:
        if not args.url:
            try:
                node = OwnNode(workdir)
            except CtlError as exc:
                say(str(exc))
                return 2
        try:
            code = asyncio.run(soak(args, workdir, node, state))
        except CtlError as exc:
            say(f"setup failed: {exc}")
            code = 2
        except (KeyboardInterrupt, asyncio.CancelledError):
            code = 130
    finally:
        workers = state.get("workers")
        if workers is not None:
            workers.kill_all_now()
        if node is not None:
            say(f"stopping node {node.name}")
            node.stop()
    ledger = state.get("ledger")
    if ledger is not None:
        text = json.dumps(ledger, indent=2, default=str)
        print(text)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = Path(args.out) if args.out else ROOT / "docs" / "reliability" / f"soak-{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        verdict = ledger["verdict"]
        say(f"ledger written to {out}")
        say("PASSED" if verdict["passed"] else "FAILED:\n  - " + "\n  - ".join(verdict["failures"]))
    if code == 0 and made_workdir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        say(f"work folder kept: {workdir} (node log, worker logs and journals)")
    return code
