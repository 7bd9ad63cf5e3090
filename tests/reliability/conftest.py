from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from .proxy import PROXIED_HEARTBEAT as HEARTBEAT

__all__ = ["HEARTBEAT"]


@pytest.fixture(scope="session")
def report() -> Iterator[dict[str, dict[str, object]]]:
    """Figures the reliability tests measured; written as JSON to $AMQPKIT_RELIABILITY_REPORT when set."""
    figures: dict[str, dict[str, object]] = {}
    yield figures
    path = os.environ.get("AMQPKIT_RELIABILITY_REPORT")
    if path:
        existing: dict[str, object] = {}
        if os.path.exists(path):
            with open(path) as f:
                existing = json.load(f)
        existing.update(figures)
        with open(path, "w") as f:
            json.dump(existing, f, indent=2, default=str)
