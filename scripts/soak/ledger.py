"""The soak's accounting, by message id, from what the load recorded. Pure functions: no broker here.

What is checked is what amqpkit promises, no more:

- **pub/sub**: a message the broker *confirmed* reaches every subscriber
  whose queue existed and was bound while it was routed. A durable shared
  subscription keeps its queue through connection cuts and broker restarts,
  so it must get every confirmed message. A private subscription's queue
  (exclusive, auto-delete) dies with its connection, and any queue deleted
  by an operator takes what it held; messages routed while such a queue was
  gone are *missed*, legitimately, and counted as such with the window.
  A window opens at the fault (minus ``margin_before`` seconds for what
  was still waiting in the queue) and closes when the subscription was
  surely back: the earliest confirm among the messages published after the
  fault that the subscriber received.
  A missing confirmed message outside every window is *lost*.
- **work queue**: every confirmed task is completed (the worker's journal)
  or in the dead-letter queue with its reason; which of the two is known
  from the task's plan.
- **RPC**: every call ends within its deadline (plus ``margin``) with the
  right result or an amqpkit error, counted by type.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SAMPLE = 20  # ids listed in the ledger per finding, at most


@dataclass
class Sent:
    """One publish (or enqueue): its id, when it started and ended (seconds from the soak's start), its outcome."""

    id: str
    start: float
    end: float = math.nan
    outcome: str = "pending"  # "confirmed", an amqpkit error type name, or "untyped:<type>"
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def confirmed(self) -> bool:
        return self.outcome == "confirmed"


@dataclass
class WindowOpen:
    """A fault after which a subscriber may legitimately miss messages."""

    subscriber: str
    at: float  # when the fault began
    kind: str  # "queue deleted" or "connection lost"
    fault: int | None = None
    after: float | None = None  # from when a message received proves the subscription back (default: ``at``)


@dataclass
class Call:
    n: int
    start: float
    timeout: float
    end: float = math.nan
    outcome: str = "pending"  # "ok", "wrong-result", an amqpkit error type name, "untyped:<type>", "did-not-end"


def percentiles(values: Sequence[float], scale: float = 1000.0) -> dict[str, float] | None:
    """p50/p90/p99/max of ``values`` (seconds), in ms by default."""
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale, 1)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1] * scale, 1)}


def _r(t: float) -> float | None:
    return None if math.isnan(t) or math.isinf(t) else round(t, 3)


# ---------------------------------------------------------------------- pub/sub


def close_windows(
    opened: Iterable[WindowOpen],
    sent: Sequence[Sent],
    arrivals: Mapping[str, Mapping[str, list[float]]],
    reference: str | None = None,
) -> list[dict[str, Any]]:
    """Each window with its end: when the subscription was surely back, and how long it took.

    A message the subscriber received was routed while its queue was bound,
    at some moment between the publish's start and its confirm. So among the
    messages published after the fault took effect (``after``) that the
    subscriber received, the earliest confirm bounds the moment it came back
    (not the earliest start: a publish started during an outage is sent after
    the reconnect). That bound is what the accounting uses.

    How long it took to come back is measured on the ``reference``
    subscriber's clock, when there is one (a subscription no fault takes
    away): from its first message sent after the fault to its copy of the
    first one the faulted subscriber got again. A publisher running behind
    delays both alike, so the backlog does not count as time away.
    """
    ref = arrivals.get(reference, {}) if reference else {}
    by_start = sorted(sent, key=lambda s: s.start)
    windows = []
    for w in sorted(opened, key=lambda w: w.at):
        got = arrivals.get(w.subscriber, {})
        after = w.at if w.after is None else w.after
        since = [s for s in by_start if s.start >= after]
        back = [s for s in since if s.id in got]
        end = min((s.end for s in back if not math.isnan(s.end)), default=math.inf)
        first_back = back[0] if back else None
        first_ref = next((s for s in since if s.id in ref), None)
        if first_back is None:
            took = math.inf
        elif ref and w.subscriber != reference and first_ref is not None:
            seen = ref.get(first_back.id, got[first_back.id])
            took = max(0.0, seen[0] - ref[first_ref.id][0]) + (after - w.at)
        else:
            took = got[first_back.id][0] - w.at
        windows.append(
            {"subscriber": w.subscriber, "kind": w.kind, "fault": w.fault, "opened": w.at, "closed": end, "took": took}
        )
    return windows


def pubsub_ledger(
    sent: Sequence[Sent],
    arrivals: Mapping[str, Mapping[str, list[float]]],
    opened: Iterable[WindowOpen],
    *,
    margin_before: float,
    restore_limit: float,
    reference: str | None = None,
) -> dict[str, Any]:
    """Per subscriber: expected (confirmed), delivered, missed in windows, lost, duplicates, latency."""
    confirmed = [s for s in sent if s.confirmed]
    unconfirmed_ids = {s.id for s in sent if not s.confirmed}
    known = {s.id for s in sent}
    windows = close_windows(opened, sent, arrivals, reference)
    failures: list[str] = []
    subscribers: dict[str, Any] = {}
    for name, got in arrivals.items():
        mine = [w for w in windows if w["subscriber"] == name]
        missed_by_window = [0] * len(mine)
        lost: list[Sent] = []
        delivered = 0
        latencies = []
        for s in confirmed:
            times = got.get(s.id)
            if times:
                delivered += 1
                latencies.append(max(0.0, times[0] - s.start))
                continue
            hit = next(
                (
                    i
                    for i, w in enumerate(mine)
                    if s.end >= w["opened"] - margin_before and s.start <= w["closed"] and not math.isinf(w["closed"])
                ),
                None,
            )
            if hit is None:
                lost.append(s)
            else:
                missed_by_window[hit] += 1
        duplicates = sum(len(t) - 1 for t in got.values() if len(t) > 1)
        shown = []
        for w, missed in zip(mine, missed_by_window, strict=True):
            length = w["closed"] - w["opened"]
            back = w["took"]
            shown.append(
                {
                    "kind": w["kind"],
                    "fault": w["fault"],
                    "opened_s": _r(w["opened"]),
                    "closed_s": _r(w["closed"]),
                    "length_s": _r(length),
                    "back_after_s": _r(back),
                    "missed": missed,
                }
            )
            if math.isinf(length):
                failures.append(
                    f"pub/sub {name}: did not get any message again after the {w['kind']} at "
                    f"t={w['opened']:.1f} s (fault {w['fault']}): the subscription never came back"
                )
            elif back > restore_limit:
                failures.append(
                    f"pub/sub {name}: took {back:.1f} s to come back after the {w['kind']} at "
                    f"t={w['opened']:.1f} s (limit {restore_limit:g} s)"
                )
        if lost:
            failures.append(
                f"pub/sub {name}: {len(lost)} confirmed messages lost (published between t={lost[0].start:.1f} s "
                f"and t={lost[-1].start:.1f} s; first ids {', '.join(s.id for s in lost[:5])})"
            )
        missed_total: Counter[str] = Counter()
        for w in shown:
            missed_total[w["kind"]] += w["missed"]
        subscribers[name] = {
            "expected": len(confirmed),
            "delivered": delivered,
            "lost": len(lost),
            "lost_sample": [{"id": s.id, "published_s": _r(s.start), "confirmed_s": _r(s.end)} for s in lost[:SAMPLE]],
            "missed_while_queue_deleted": missed_total["queue deleted"],
            "missed_while_disconnected": missed_total["connection lost"],
            "windows": shown,
            "duplicates": duplicates,
            "delivered_though_unconfirmed": sum(1 for i in got if i in unconfirmed_ids),
            "unknown_ids": sum(1 for i in got if i not in known),
            "latency_ms": percentiles(latencies),
        }
    outcomes = Counter(s.outcome for s in sent)
    untyped = sum(n for o, n in outcomes.items() if o.startswith("untyped:") or o == "pending")
    if untyped:
        failures.append(f"pub/sub: {untyped} publishes ended without a result or an amqpkit error: {dict(outcomes)}")
    return {
        "published": {
            "attempted": len(sent),
            "confirmed": len(confirmed),
            "not_confirmed_by_error": {o: n for o, n in sorted(outcomes.items()) if o != "confirmed"},
        },
        "subscribers": subscribers,
        "failures": failures,
    }


# ---------------------------------------------------------------------- work queue


def expected_outcome(plan: Mapping[str, Any]) -> str:
    """What the task's plan says must become of it: "completed", or the DLQ reason."""
    fatal = plan.get("fatal")
    if fatal == "reject":
        return "dlq:rejected"
    if fatal == "fail":
        return "dlq:max-attempts"
    return "completed"


def task_ledger(
    enqueued: Sequence[Sent],
    journal: Iterable[Mapping[str, Any]],
    dead_letters: Iterable[Mapping[str, Any]],
    *,
    wall0: float = 0.0,
) -> dict[str, Any]:
    """Every confirmed task: completed, or in the DLQ with its reason; none unaccounted for.

    ``wall0``: the soak's start on the wall clock (the journal's times are wall-clock).

    ``journal``: the workers' lines (id, attempt, outcome: done/fail/reject, t).
    ``dead_letters``: what the DLQ holds (task_id, reason, attempts, error).
    """
    confirmed = [s for s in enqueued if s.confirmed]
    unconfirmed_ids = {s.id for s in enqueued if not s.confirmed}
    done: Counter[str] = Counter()
    attempts: dict[str, list[Mapping[str, Any]]] = {}
    for line in journal:
        attempts.setdefault(str(line.get("id")), []).append(line)
        if line.get("outcome") == "done":
            done[str(line.get("id"))] += 1
    dlq: dict[str, list[Mapping[str, Any]]] = {}
    for letter in dead_letters:
        dlq.setdefault(str(letter.get("task_id")), []).append(letter)
    unaccounted: list[Sent] = []
    wrong: list[dict[str, Any]] = []
    by_reason: Counter[str] = Counter()
    completed = 0
    for s in confirmed:
        want = expected_outcome(s.plan)
        letters = dlq.get(s.id, [])
        if done[s.id]:
            completed += 1
            if want != "completed":
                wrong.append({"id": s.id, "plan": s.plan, "expected": want, "got": "completed"})
        if letters:
            reasons = sorted({str(x.get("reason")) for x in letters})
            for r in reasons:
                by_reason[r] += 1
            if want == "completed" and not done[s.id]:
                wrong.append(
                    {
                        "id": s.id,
                        "plan": s.plan,
                        "expected": want,
                        "got": f"dlq:{'/'.join(reasons)}",
                        "error": letters[0].get("error"),
                    }
                )
            elif want != "completed" and f"dlq:{reasons[0]}" != want:
                wrong.append({"id": s.id, "plan": s.plan, "expected": want, "got": f"dlq:{'/'.join(reasons)}"})
        if not done[s.id] and not letters:
            unaccounted.append(s)
    failures: list[str] = []
    if unaccounted:
        failures.append(
            f"work queue: {len(unaccounted)} confirmed tasks are neither completed nor in the DLQ "
            f"(enqueued between t={unaccounted[0].start:.1f} s and t={unaccounted[-1].start:.1f} s)"
        )
    if wrong:
        failures.append(f"work queue: {len(wrong)} tasks ended other than their plan says (first: {wrong[0]})")
    outcomes = Counter(s.outcome for s in enqueued)
    untyped = sum(n for o, n in outcomes.items() if o.startswith("untyped:") or o == "pending")
    if untyped:
        failures.append(f"work queue: {untyped} enqueues ended without a result or an amqpkit error")
    plans = Counter(expected_outcome(s.plan) + (":retried" if s.plan.get("fail_times") else "") for s in confirmed)
    fails = sum(1 for lines in attempts.values() for x in lines if x.get("outcome") == "fail")

    def last_seen(task_id: str) -> Any:
        lines = attempts.get(task_id)
        if not lines:
            return None
        last = max(lines, key=lambda x: float(x.get("t", 0)))
        return {
            "attempt": last.get("attempt"),
            "outcome": last.get("outcome"),
            "pid": last.get("pid"),
            "t_s": round(float(last.get("t", 0)) - wall0, 3),
        }

    return {
        "enqueued": {
            "attempted": len(enqueued),
            "confirmed": len(confirmed),
            "not_confirmed_by_error": {o: n for o, n in sorted(outcomes.items()) if o != "confirmed"},
        },
        "plan": dict(sorted(plans.items())),
        "completed": completed,
        "completed_twice_or_more": sum(1 for s in confirmed if done[s.id] > 1),
        "extra_completions": sum(n - 1 for i, n in done.items() if n > 1 and i not in unconfirmed_ids),
        "dead_lettered": sum(1 for s in confirmed if s.id in dlq),
        "dead_lettered_by_reason": dict(sorted(by_reason.items())),
        "dlq_duplicates": sum(len(v) - 1 for v in dlq.values() if len(v) > 1),
        "failed_attempts_retried_or_final": fails,
        "max_attempt_seen": max((int(x.get("attempt", 0)) for v in attempts.values() for x in v), default=0),
        "unaccounted": len(unaccounted),
        "unaccounted_sample": [
            {"id": s.id, "enqueued_s": _r(s.start), "plan": s.plan, "last_seen": last_seen(s.id)}
            for s in unaccounted[:SAMPLE]
        ],
        "wrong_outcome": len(wrong),
        "wrong_outcome_sample": wrong[:SAMPLE],
        "completed_though_unconfirmed": sum(1 for i in done if i in unconfirmed_ids),
        "failures": failures,
    }


# ---------------------------------------------------------------------- RPC


def rpc_ledger(calls: Sequence[Call], *, margin: float, stalls: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
    """Every call ended within its deadline plus ``margin`` with a result or a typed error.

    ``stalls``: (when, seconds) the soak's own event loop woke late. No asyncio code can end a call
    while its loop is not running, so a call late by no more than the stalls during it is counted
    apart (``late_during_loop_stalls``) and does not fail the soak; the stalls are in the ledger.
    """
    outcomes = Counter(c.outcome for c in calls)
    overdue = [c for c in calls if not math.isnan(c.end) and c.end - c.start > c.timeout + margin]

    def stalled(c: Call) -> float:
        return sum(lag for t, lag in stalls if c.start <= t <= c.end + 0.2)

    late = [c for c in overdue if c.end - c.start - c.timeout - margin > stalled(c)]
    late_ids = {id(c) for c in late}
    excused = [c for c in overdue if id(c) not in late_ids]
    excused_ids = {id(c) for c in excused}
    ended = [c for c in calls if not math.isnan(c.end)]
    overrun = max((c.end - c.start - c.timeout for c in ended if id(c) not in excused_ids), default=0.0)
    overrun_stalled = max((c.end - c.start - c.timeout for c in ended), default=0.0)
    untyped = sum(n for o, n in outcomes.items() if o.startswith("untyped:") or o in ("pending", "did-not-end"))
    failures = []
    if late:
        failures.append(
            f"rpc: {len(late)} calls ended later than their deadline + {margin:g} s "
            f"(worst {overrun:.2f} s over; first at t={late[0].start:.1f} s)"
        )
    if untyped:
        failures.append(
            f"rpc: {untyped} calls ended without a result or an amqpkit error: "
            f"{ {o: n for o, n in outcomes.items() if o.startswith('untyped:') or o in ('pending', 'did-not-end')} }"
        )
    if outcomes["wrong-result"]:
        failures.append(f"rpc: {outcomes['wrong-result']} calls returned a wrong result")
    ok = [c.end - c.start for c in calls if c.outcome == "ok"]
    return {
        "calls": len(calls),
        "ok": outcomes["ok"],
        "errors_by_type": {o: n for o, n in sorted(outcomes.items()) if o != "ok"},
        "late": len(late),
        "late_during_loop_stalls": len(excused),
        "late_sample": [
            {"n": c.n, "started_s": _r(c.start), "took_s": _r(c.end - c.start), "outcome": c.outcome}
            for c in late[:SAMPLE]
        ],
        "worst_overrun_s": round(max(0.0, overrun), 3),
        "worst_overrun_with_loop_stalls_s": round(max(0.0, overrun_stalled), 3),
        "deadline_s": calls[0].timeout if calls else None,
        "margin_s": margin,
        "latency_ok_ms": percentiles(ok),
        "failures": failures,
    }
