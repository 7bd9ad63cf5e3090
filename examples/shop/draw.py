"""``python -m examples.shop trace ORDER_ID``: the trace of an order, from the spans the processes exported.

Reads every ``*.jsonl`` in ``SHOP_TRACES`` (see :mod:`examples.shop.tracing`),
finds the trace in which the order's task was sent (the task's message id is
the order id), and prints it as a tree: start offset,
duration, kind, name and the process that made the span.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def load(folder: Path) -> list[dict[str, Any]]:
    spans = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


def trace_of(spans: list[dict[str, Any]], order_id: str) -> list[dict[str, Any]]:
    """Every span of the trace in which the order's task was sent (its message id is the order id).

    Other traces may mention the order too (a replay of the event log, an
    event sent again by hand): they start elsewhere and are left out.
    """
    traces = {
        s["trace_id"]
        for s in spans
        if s["kind"] == "PRODUCER" and s["attributes"].get("messaging.message.id") == order_id
    }
    return [s for s in spans if s["trace_id"] in traces]


def tree(spans: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(depth, span) in start order, each child under its parent."""
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in spans:
        parent = span["parent_id"] if span["parent_id"] in ids else None
        children.setdefault(parent, []).append(span)
    out: list[tuple[int, dict[str, Any]]] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s["start"]):
            out.append((depth, span))
            walk(span["span_id"], depth + 1)

    walk(None, 0)
    return out


def describe(spans: list[dict[str, Any]]) -> str:
    if not spans:
        return "no spans"
    start = min(s["start"] for s in spans)
    lines = []
    for depth, span in tree(spans):
        offset = (span["start"] - start) / 1e6
        duration = (span["end"] - span["start"]) / 1e6
        label = f"{'  ' * depth}{span['kind']:<8} {span['name']}"
        lines.append(f"{offset:9.1f} ms {duration:8.1f} ms  {label:<60} [{span['service']}]")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    folder = os.environ.get("SHOP_TRACES")
    if not argv or not folder:
        print("usage: SHOP_TRACES=DIR python -m examples.shop trace ORDER_ID", file=sys.stderr)
        return 2
    spans = trace_of(load(Path(folder)), argv[0])
    print(f"{len(spans)} spans in {len({s['trace_id'] for s in spans})} trace(s)")
    print(describe(spans))
    return 0
