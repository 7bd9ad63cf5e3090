"""scripts/otel_minutes.py: instrumentation over minutes (every span exported and paired, memory flat).

Checked here in seconds: it runs against the broker the tests use and says OK with lean spans and with the
SDK's; and its pairing finds a child whose parent never came, and a parent whose child never came.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from amqpkit.telemetry import lean

from .. import processes

pytestmark = pytest.mark.usefixtures("spawned")  # every process a test starts is ended, whatever the outcome

SCRIPT = Path(__file__).resolve().parent.parent.parent / "scripts" / "otel_minutes.py"


@pytest.mark.parametrize("spans", ["lean", "sdk"])
async def test_a_short_run_exports_and_pairs_every_span(amqp_url: str, spans: str) -> None:
    argv = [sys.executable, str(SCRIPT), "--seconds", "3", *(["--sdk"] if spans == "sdk" else [])]
    proc = await processes.spawn(
        *argv, env={**os.environ, "AMQP_URL": amqp_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out_bytes, err_bytes = await asyncio.wait_for(proc.communicate(), 120)
    out = out_bytes.decode()
    assert proc.returncode == 0, out + err_bytes.decode()
    assert out.rstrip().endswith("OK")
    assert "unpaired: 0" in out
    lean_expected = spans == "lean" and lean._release() >= lean.SDK_TESTED_FROM
    assert ("'LeanSpan'" in out) is lean_expected


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("otel_minutes", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _span(kind: SpanKind, span_id: int, parent_id: int | None = None) -> ReadableSpan:
    parent = SpanContext(1, parent_id, True, TraceFlags(1)) if parent_id is not None else None
    return ReadableSpan("x", SpanContext(1, span_id, False, TraceFlags(1)), parent, kind=kind)


def test_the_pairing_finds_what_came_alone() -> None:
    pairing = _script().Pairing()
    pairing.export([_span(SpanKind.CONSUMER, 11, parent_id=10), _span(SpanKind.PRODUCER, 10)])  # child first
    pairing.export([_span(SpanKind.CLIENT, 20)])
    pairing.export([_span(SpanKind.SERVER, 21, parent_id=20)])
    assert not pairing.parents_waiting and not pairing.children_waiting
    pairing.export([_span(SpanKind.PRODUCER, 30), _span(SpanKind.SERVER, 41, parent_id=40)])
    assert pairing.parents_waiting == {30} and pairing.children_waiting == {40}
