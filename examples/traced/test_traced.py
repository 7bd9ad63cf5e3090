"""The traced example against a real broker (the plugin's own vhost): one trace across RPC, an event and a retry."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.trace import SpanKind

from examples.traced import RPC_QUEUE, TASKS, run_once
from examples.traced.draw import draw, ordered


async def test_one_trace_across_rpc_an_event_and_a_retried_task(amqp_url: str, tmp_path: Path) -> None:
    spans = await run_once(amqp_url)
    assert len({s.context.trace_id for s in spans}) == 1
    by_name: dict[str, list[SpanKind]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span.kind)
    assert by_name["POST /orders"] == [SpanKind.SERVER]
    assert sorted(by_name[f"{RPC_QUEUE}/place"], key=str) == sorted([SpanKind.CLIENT, SpanKind.SERVER], key=str)
    assert by_name["send traced.orders"] == [SpanKind.PRODUCER]
    assert by_name[f"process {TASKS}"] == [SpanKind.CONSUMER, SpanKind.CONSUMER]  # two attempts
    roots = [s for s in spans if s.parent is None]
    assert [s.name for s in roots] == ["POST /orders"]
    assert next(depth for depth, _ in ordered(spans)) == 0
    png = tmp_path / "trace.png"
    draw(spans, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
