"""The soak's ledger (scripts/soak/ledger.py): it must call a loss a loss, and only a loss.

The soak itself runs in CI as ``bash scripts/soak.sh --seconds 90``; these
tests pin down its accounting on records made by hand, so a soak that
passes means what it says.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from soak.ledger import Call, Sent, WindowOpen, pubsub_ledger, rpc_ledger, task_ledger


def _sent(n: int, *, every: float = 0.1) -> list[Sent]:
    return [Sent(id=f"e{i}", start=i * every, end=i * every + 0.01, outcome="confirmed") for i in range(n)]


def _got(sent: list[Sent], skip: set[str] | frozenset[str] = frozenset()) -> dict[str, list[float]]:
    return {s.id: [s.end + 0.01] for s in sent if s.id not in skip}


def test_a_confirmed_message_missing_outside_any_window_is_lost() -> None:
    sent = _sent(100)
    ledger = pubsub_ledger(sent, {"sub-1": _got(sent, {"e42"})}, [], margin_before=2, restore_limit=30)
    sub = ledger["subscribers"]["sub-1"]
    assert (sub["expected"], sub["delivered"], sub["lost"]) == (100, 99, 1)
    assert sub["lost_sample"][0]["id"] == "e42"
    assert any("1 confirmed messages lost" in f for f in ledger["failures"])


def test_messages_missed_while_the_queue_was_deleted_are_counted_apart_not_lost() -> None:
    sent = _sent(100)  # e0 at t=0 ... e99 at t=9.9
    # The queue was deleted at t=5.0 (the command returned at 5.2) and was back for e60 (sent at t=6.0,
    # confirmed at 6.01).
    missed = {f"e{i}" for i in range(49, 60)}
    window = WindowOpen("sub-3", 5.0, "queue deleted", fault=4, after=5.2)
    ledger = pubsub_ledger(sent, {"sub-3": _got(sent, missed)}, [window], margin_before=0.5, restore_limit=30)
    sub = ledger["subscribers"]["sub-3"]
    assert sub["lost"] == 0
    assert sub["missed_while_queue_deleted"] == len(missed)
    assert sub["windows"][0]["closed_s"] == 6.01
    assert ledger["failures"] == []


def test_a_message_missing_before_the_window_margin_is_still_lost() -> None:
    sent = _sent(100)
    missed = {"e10"} | {f"e{i}" for i in range(50, 60)}  # e10 (t=1.0) is long before the delete at t=5.0
    window = WindowOpen("sub-3", 5.0, "queue deleted", fault=4, after=5.0)
    ledger = pubsub_ledger(sent, {"sub-3": _got(sent, missed)}, [window], margin_before=0.5, restore_limit=30)
    sub = ledger["subscribers"]["sub-3"]
    assert sub["lost"] == 1
    assert sub["lost_sample"][0]["id"] == "e10"


def test_a_window_closes_at_a_confirm_not_at_a_start() -> None:
    """A publish started during an outage is sent after the reconnect: its start proves nothing."""
    sent = _sent(100)
    # Broker down from t=5.0 to t=7.0: e50..e69 wait and are confirmed at 7.05; the subscription is back at 7.1.
    for s in sent[50:70]:
        s.end = 7.05
    got = _got(sent, {f"e{i}" for i in range(45, 71)})
    got.update({f"e{i}": [7.2] for i in range(60, 70)})  # routed after it was back
    window = WindowOpen("sub-3", 5.0, "connection lost", fault=2)
    ledger = pubsub_ledger(sent, {"sub-3": got}, [window], margin_before=0.5, restore_limit=30)
    sub = ledger["subscribers"]["sub-3"]
    assert sub["windows"][0]["closed_s"] == 7.05
    assert (sub["lost"], sub["missed_while_disconnected"]) == (0, 16)  # e45..e59 and e70 (sent at 7.0)


def test_a_subscription_that_never_comes_back_fails_the_soak() -> None:
    sent = _sent(100)
    missed = {f"e{i}" for i in range(50, 100)}
    window = WindowOpen("sub-3", 5.0, "connection lost", fault=1)
    ledger = pubsub_ledger(sent, {"sub-3": _got(sent, missed)}, [window], margin_before=0.5, restore_limit=30)
    assert ledger["subscribers"]["sub-3"]["lost"] == 50
    assert any("never came back" in f for f in ledger["failures"])


def test_duplicates_and_unconfirmed_publishes_are_counted_not_failed() -> None:
    sent = _sent(10)
    sent.append(Sent(id="e10", start=1.0, end=31.0, outcome="PublishTimeout"))
    got = _got(sent)
    got["e3"].append(2.0)
    ledger = pubsub_ledger(sent, {"sub-1": got}, [], margin_before=2, restore_limit=30)
    sub = ledger["subscribers"]["sub-1"]
    assert (sub["duplicates"], sub["delivered_though_unconfirmed"], sub["lost"]) == (1, 1, 0)
    assert ledger["published"]["not_confirmed_by_error"] == {"PublishTimeout": 1}
    assert ledger["failures"] == []


def test_every_task_must_be_completed_or_dead_lettered_as_its_plan_says() -> None:
    enqueued = [
        Sent(id="ok", start=0, end=0.1, outcome="confirmed", plan={}),
        Sent(id="retried", start=0, end=0.1, outcome="confirmed", plan={"fail_times": 2}),
        Sent(id="fatal", start=0, end=0.1, outcome="confirmed", plan={"fatal": "fail"}),
        Sent(id="rejected", start=0, end=0.1, outcome="confirmed", plan={"fatal": "reject"}),
        Sent(id="vanished", start=1, end=1.1, outcome="confirmed", plan={"fail_times": 1}),
        Sent(id="misfiled", start=2, end=2.1, outcome="confirmed", plan={}),
    ]
    journal = [
        {"id": "ok", "attempt": 1, "outcome": "done", "t": 1},
        {"id": "retried", "attempt": 3, "outcome": "done", "t": 2},
        {"id": "retried", "attempt": 3, "outcome": "done", "t": 3},
        {"id": "vanished", "attempt": 1, "outcome": "fail", "t": 4},
    ]
    dlq = [
        {"task_id": "fatal", "reason": "max-attempts", "attempts": 5},
        {"task_id": "rejected", "reason": "rejected", "attempts": 1},
        {"task_id": "misfiled", "reason": "delivery_limit", "attempts": 20},
    ]
    ledger = task_ledger(enqueued, journal, dlq)
    assert ledger["completed"] == 2
    assert ledger["extra_completions"] == 1
    assert ledger["dead_lettered_by_reason"] == {"delivery_limit": 1, "max-attempts": 1, "rejected": 1}
    assert ledger["unaccounted"] == 1
    assert ledger["unaccounted_sample"][0]["id"] == "vanished"
    assert ledger["unaccounted_sample"][0]["last_seen"]["outcome"] == "fail"
    assert ledger["wrong_outcome"] == 1
    assert ledger["wrong_outcome_sample"][0]["id"] == "misfiled"
    assert len(ledger["failures"]) == 2


def test_rpc_calls_must_end_in_time_with_a_result_or_a_typed_error() -> None:
    calls = [
        Call(n=0, start=0.0, timeout=2.0, end=0.01, outcome="ok"),
        Call(n=1, start=0.0, timeout=2.0, end=2.05, outcome="RpcTimeout"),
        Call(n=2, start=0.0, timeout=2.0, end=0.5, outcome="ConnectionLost"),
    ]
    clean = rpc_ledger(calls, margin=1.0)
    assert clean["failures"] == []
    assert clean["errors_by_type"] == {"ConnectionLost": 1, "RpcTimeout": 1}
    calls += [
        Call(n=3, start=1.0, timeout=2.0, end=6.0, outcome="RpcTimeout"),
        Call(n=4, start=1.0, timeout=2.0, end=1.2, outcome="untyped:CancelledError"),
        Call(n=5, start=1.0, timeout=2.0, end=1.2, outcome="wrong-result"),
    ]
    ledger = rpc_ledger(calls, margin=1.0)
    assert ledger["late"] == 1
    assert ledger["worst_overrun_s"] == 3.0
    assert len(ledger["failures"]) == 3


def test_a_call_late_only_by_a_stall_of_the_soaks_own_event_loop_is_counted_apart() -> None:
    """No asyncio code ends a call while its loop is not running: such lateness is reported, not failed."""
    calls = [
        Call(n=0, start=10.0, timeout=2.0, end=13.4, outcome="RpcTimeout"),  # 1.4 s over; the loop stalled 1.9 s
        Call(n=1, start=20.0, timeout=2.0, end=25.0, outcome="RpcTimeout"),  # 3 s over; stalled only 0.3 s
    ]
    ledger = rpc_ledger(calls, margin=1.0, stalls=[(13.3, 1.9), (24.0, 0.3)])
    assert (ledger["late"], ledger["late_during_loop_stalls"]) == (1, 1)
    assert ledger["late_sample"][0]["n"] == 1
    assert ledger["worst_overrun_s"] == 3.0
    assert len(ledger["failures"]) == 1


def test_the_time_to_come_back_does_not_count_a_publisher_running_behind() -> None:
    """Measured against a subscription no fault touched: a backlog delays both alike."""
    sent = _sent(100)
    got = _got(sent, {"e49", "e50"})
    for s in sent[48:]:
        s.end = s.start + 40  # the publisher runs 40 s behind from t=4.8 on: sends, confirms, deliveries
    for i in range(48, 100):
        got.get(f"e{i}", [0.0])[0] += 40
    reference = {s.id: [t + 40 if i >= 48 else t for t in _got(sent)[s.id]] for i, s in enumerate(sent)}
    window = WindowOpen("sub-2", 4.95, "queue deleted", fault=8, after=4.95)
    arrivals = {"sub-1": reference, "sub-2": got}
    ledger = pubsub_ledger(sent, arrivals, [window], margin_before=0.5, restore_limit=30, reference="sub-1")
    shown = ledger["subscribers"]["sub-2"]["windows"][0]
    assert shown["back_after_s"] < 1
    assert ledger["subscribers"]["sub-2"]["lost"] == 0
    assert ledger["failures"] == []
    alone = pubsub_ledger(sent, {"sub-2": got}, [window], margin_before=0.5, restore_limit=30)
    assert any("to come back" in f for f in alone["failures"])
