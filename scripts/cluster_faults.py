"""The full fault runs on the three-node cluster (scripts/cluster.sh), each ending with an id-level ledger.

    scripts/cluster.sh up
    .venv/bin/python scripts/cluster_faults.py --runs kill,partition,rolling --repeat 3 --out docs/reliability

Runs (issue 19):
  kill       SIGKILL the node the client is connected to during 10,000 confirmed publishes and
             their consumption on a quorum queue; the node is started again 10 s later.
             RPC at 200 calls/s throughout.
  partition  cut the node the client is connected to off from the other two for 20 s during the
             same load, then heal. Meanwhile a second client, on the cut-off node only, publishes
             and must never be told "confirmed" for a publish the majority did not take.
  rolling    stop and start each node in turn (1, 2, 3) under the same load. RPC at 200 calls/s.
Each run writes docs/reliability/cluster-<run>-<n>.json. A run passes when no confirmed message
is lost, no RPC call hung or returned a wrong result, every error was typed, and the minority
client saw no success. Exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amqpkit import AmqpkitError, Broker, BrokerSettings, Envelope, ReconnectPolicy
from tests.cluster import load as L


async def minority_prober(url: str, queue: str, stop: asyncio.Event, out: dict[str, Any]) -> None:
    """Publish through the cut-off node alone; every publish must fail (typed) or time out."""
    policy = ReconnectPolicy(initial_delay=0.2, max_delay=1, connect_attempts=1000)
    settings = BrokerSettings(url=url, connect_timeout=3, publish_timeout=5, reconnect=policy)
    broker = Broker(settings)
    out.update(attempts=0, succeeded=0, errors={})
    try:
        await broker.connect()
        while not stop.is_set():
            out["attempts"] += 1
            try:
                await broker.publish(Envelope(b"minority", message_id=f"minority-{out['attempts']}"),
                                     routing_key=queue, timeout=5)  # fmt: skip
                out["succeeded"] += 1
                out.setdefault("succeeded_at", []).append(round(time.monotonic() - out["cut_at"], 2))
            except AmqpkitError as exc:
                out["errors"][type(exc).__name__] = out["errors"].get(type(exc).__name__, 0) + 1
            await asyncio.sleep(0.5)  # a probe every half second
    finally:
        await broker.close(grace=1)


async def rpc_child(tag: str, rate: float) -> None:
    """``--rpc-child``: RPC load in a process of its own (its own share of the CPU) until a line on stdin."""
    client = Broker(L.settings(1, connection_name="faults-rpc-client"))
    server = Broker(L.settings(2, connection_name="faults-rpc-server"))
    await client.connect()
    await server.connect()
    rpc = L.RpcLoad(client, server, f"faults-rpc-{tag}", rate=rate)
    try:
        async with rpc:
            running = asyncio.create_task(rpc.run())
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            await rpc.finish()
            await running
    finally:
        await client.close(grace=1)
        await server.close(grace=1)
    print(json.dumps(rpc.ledger.summary()), flush=True)


class RpcProcess:
    def __init__(self, tag: str, rate: float) -> None:
        self.tag, self.rate = tag, rate
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--rpc-child", self.tag, "--rpc-rate", str(self.rate),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"the RPC load did not start: {line!r}")

    async def finish(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"stop\n")
        await self.proc.stdin.drain()
        out, _ = await asyncio.wait_for(self.proc.communicate(), 120)
        return dict(json.loads(out.decode().strip().splitlines()[-1]))

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def one_run(kind: str, messages: int, rpc_rate: float) -> dict[str, Any]:
    await L.restore()
    tag = uuid.uuid4().hex[:8]
    queue = L.quorum(f"faults-{kind}-{tag}")
    rate = {"kill": 300.0, "partition": 200.0, "rolling": 110.0}[kind]
    broker = Broker(L.settings(1, connection_name=f"faults-{kind}"))
    events: list[dict[str, Any]] = []
    began = time.monotonic()

    def note(what: str, **kw: Any) -> None:
        events.append({"t": round(time.monotonic() - began, 2), "event": what, **kw})

    report: dict[str, Any] = {"run": kind, "queue_type": "quorum", "publish_rate": rate,
                              "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}  # fmt: skip
    await broker.connect()
    await broker.declare_queue(queue)
    load = L.Load(broker, queue, messages, rate=rate, workers=64)
    rpc = RpcProcess(tag, rpc_rate) if kind != "partition" else None
    minority: dict[str, Any] = {}
    try:
        await load.start_consumer()
        if rpc is not None:
            await rpc.start()
        publishing = asyncio.create_task(load.publish_all())
        await asyncio.sleep(0)
        while len(load.ledger.confirmed) < messages * 0.3:  # noqa: ASYNC110 - polling a count
            await asyncio.sleep(0.05)
        victim = L.connected_node(broker)
        fault_at = time.monotonic()
        if kind == "kill":
            note("kill", node=victim)
            await L.acluster("kill", str(victim))
            await asyncio.sleep(10)  # the node stays dead for 10 s
            note("start", node=victim)
            await L.acluster("start", str(victim))
            note("started", node=victim)
        elif kind == "partition":
            stop_probe = asyncio.Event()
            minority["cut_at"] = time.monotonic()
            await L.acluster("partition", str(victim))
            note("partition", node=victim)
            probe = asyncio.create_task(minority_prober(L.urls()[victim - 1], queue.name, stop_probe, minority))
            await asyncio.sleep(20)  # the cut lasts 20 s
            stop_probe.set()
            await L.acluster("heal")
            note("heal")
            await probe
            minority.pop("cut_at", None)
            await L.acluster("ctl", str(victim), "await_startup", "--timeout", "120")
            note("minority node back", node=victim)
        else:
            for n in (1, 2, 3):
                note("stop", node=n)
                await L.acluster("stop", str(n))
                note("start", node=n)
                await L.acluster("start", str(n))
                note("started", node=n)
        await publishing
        note("all published")
        drained = await load.drain(120)
        await asyncio.sleep(3)  # late duplicates (redeliveries) still count in the ledger
        note("drained" if drained else "drain timed out")
        rpc_summary = await rpc.finish() if rpc is not None else {}
        report["ledger"] = load.ledger.summary()
        report["fault_node"] = victim
        report["longest_confirm_gap_after_fault_s"] = round(load.ledger.longest_gap(after=fault_at), 3)
        report["events"] = events
        if rpc is not None:
            report["rpc"] = {"rate": rpc_rate, **rpc_summary}
        if minority:
            report["minority_publishes"] = minority
    finally:
        await load.stop()
        if rpc is not None:
            await rpc.kill()
        with contextlib.suppress(Exception):
            await broker.delete_queue(queue)
        await broker.close(grace=1)
    led = report["ledger"]
    problems = []
    if led["lost"]:
        problems.append(f"{led['lost']} confirmed messages lost")
    if len(load.ledger.confirmed) != messages:
        problems.append("not every message was confirmed")
    if rpc is not None:
        r = report["rpc"]
        if r["hung"] or r["wrong_results"] or r["untyped_errors"]:
            problems.append("RPC: hung, wrong or untyped")
    if minority.get("succeeded"):
        problems.append(f"{minority['succeeded']} publishes to the minority node reported success")
    report["problems"] = problems
    report["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    report["passed"] = not problems
    return report


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="kill,partition,rolling")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rpc-rate", type=float, default=200.0)
    parser.add_argument("--out", type=Path, default=Path("docs/reliability"))
    parser.add_argument("--rpc-child", metavar="TAG", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=1, help="number of the first ledger file of each run")
    args = parser.parse_args()
    if args.rpc_child:
        await rpc_child(args.rpc_child, args.rpc_rate)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    for i in range(args.first, args.first + args.repeat):
        for kind in args.runs.split(","):
            report = await one_run(kind, args.messages, args.rpc_rate)
            report["repeat"] = i
            path = args.out / f"cluster-{kind}-{i}.json"
            path.write_text(json.dumps(report, indent=1) + "\n")
            led = report["ledger"]
            print(f"{kind} #{i}: {'PASS' if report['passed'] else 'FAIL'} lost={led['lost']} dup={led['duplicated']} "
                  f"reconnect_s={led['reconnect_seconds']} gap_s={report['longest_confirm_gap_after_fault_s']} "
                  f"rpc={report.get('rpc', {}).get('errors')} minority={report.get('minority_publishes')} "
                  f"problems={report['problems']} -> {path}", flush=True)  # fmt: skip
            failed = failed or not report["passed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
