"""BenchParams: what a benchmark runs, checked before anything starts.

The scenarios (expanded), the load levels (closed-loop concurrencies, an
open-loop rate or a ``burst`` profile), how long each run lasts, and what the
run compares: brokers (``targets``), instrumentation modes (``otel``) and
event loops (``loop``).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..settings import redact_url
from .base import Kind
from .burst import profile_seconds
from .otel import OTEL_MODES
from .results import Arm
from .scenarios import expand, is_chain, kind_of

__all__ = ["DEFAULT_SCENARIOS", "LOOPS", "BenchParams"]

DEFAULT_SCENARIOS = ("rpc", "rpc-reply-queue", "oneway", "oneway-confirmed", "raw-rpc", "raw-oneway")
LOOPS = ("asyncio", "uvloop")
TARGET_NAME = re.compile(r"[A-Za-z0-9._-]+")


class BenchParams(BaseModel):
    """What to run. Either ``messages`` or ``duration`` bounds each run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    concurrency: tuple[int, ...] = (1, 8, 64)
    rate: float | None = Field(default=None, gt=0)
    messages: int | None = Field(default=None, gt=0)
    duration: float | None = Field(default=None, gt=0)
    warmup: int | None = Field(default=None, ge=0)
    size: int = Field(default=128, ge=0)
    inproc: bool = False
    queue_type: str = "classic"
    repeat: int = Field(default=1, ge=1)
    prefetch: int = Field(default=256, ge=1, le=65535)  # the most a basic.qos carries
    workers: int = Field(default=1, ge=1, description="worker processes for the workqueue scenarios")
    stall_ms: int = Field(default=0, ge=0)
    stall_after: int = Field(default=0, ge=0)
    burst: tuple[tuple[float, float], ...] | None = Field(default=None, description="(rate, seconds) steps")
    service_ms: float = Field(default=0.0, ge=0, description="each server's own work per request")
    task_cpu_ms: float = Field(default=0.0, ge=0, description="a work-queue task's CPU work (busy, its own CPU time)")
    deadline: float = Field(default=30.0, gt=0, description="a caller's deadline, seconds")
    loop: tuple[str, ...] = ("asyncio",)
    targets: tuple[tuple[str, tuple[str, ...]], ...] = Field(
        default=(),
        description="(name, URLs) of each broker run against, in place of url; the first is the reference",
    )
    otel: tuple[str, ...] = Field(default=(), description="instrumentation modes to run in: off, noop, batch")
    paired: bool = Field(default=False, description="at one call in flight, the scenarios' calls alternate one by one")

    @model_validator(mode="after")
    def _check(self) -> BenchParams:
        object.__setattr__(self, "scenarios", expand(self.scenarios))
        self._check_arms()
        if not self.loop or any(loop not in LOOPS for loop in self.loop):
            raise ValueError(f"loop is one or more of {', '.join(LOOPS)}")
        if self.burst is not None and self.rate is not None:
            raise ValueError("--burst and --rate are two different open loops: give one")
        if self.messages is None and self.duration is None:
            object.__setattr__(self, "messages", 5000)
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be at least 1")
        if self.queue_type not in ("classic", "quorum"):
            raise ValueError("queue_type is classic or quorum")
        if self.paired:
            self._check_paired()
        return self

    def _check_paired(self) -> None:
        """``paired`` alternates single calls: only calls answered by one server, in a closed loop at 1."""
        odd = [s for s in self.scenarios if kind_of(s) is not Kind.CALL or is_chain(s)]
        if odd:
            raise ValueError(f"--paired alternates calls to one server: {odd[0]} is not one (rpc, raw-rpc, ...)")
        if self.rate is not None or self.burst is not None:
            raise ValueError("--paired is a closed loop at one call in flight: no --rate or --burst with it")
        if 1 not in self.concurrency:
            raise ValueError("--paired measures at one call in flight: put 1 in --concurrency")
        if self.messages is None:
            raise ValueError("--paired counts calls: give --messages, not --duration")

    def _check_arms(self) -> None:
        names = [name for name, _ in self.targets]
        for name, urls in self.targets:
            if not TARGET_NAME.fullmatch(name):
                raise ValueError(f"target name {name!r}: letters, digits, '.', '_' and '-' only")
            if not urls:
                raise ValueError(f"target {name}: no URL")
            for url in urls:
                if urlsplit(url).scheme not in ("amqp", "amqps"):
                    raise ValueError(f"target {name}: not an AMQP URL: {redact_url(url)}")
        if len(set(names)) != len(names):
            raise ValueError("target names must differ")
        unknown = [mode for mode in self.otel if mode not in OTEL_MODES]
        if unknown:
            raise ValueError(f"unknown otel mode {unknown[0]!r}; valid: {', '.join(OTEL_MODES)}")
        if len(set(self.otel)) != len(self.otel):
            raise ValueError("otel modes must differ")
        if (self.otel or len(self.arms()) > 1) and len(self.loop) > 1:
            raise ValueError("targets and otel modes are compared on one event loop: give one --loop")
        if len(self.arms()) > 1 and self.burst is not None:
            raise ValueError("--burst runs on one broker in one mode: no --target list or --otel list with it")

    def arms(self) -> list[Arm]:
        """What the run compares: every target in every otel mode (one arm when neither is given)."""
        targets: list[tuple[str | None, tuple[str, ...]]] = list(self.targets) or [(None, (self.url,))]
        modes: list[str | None] = list(self.otel) or [None]
        return [
            Arm(name="/".join(part for part in (target, mode) if part) or "default", target=target, urls=urls,
                otel=mode)
            for target, urls in targets for mode in modes
        ]  # fmt: skip

    def warmup_count(self) -> int:
        if self.warmup is not None:
            return self.warmup
        if self.messages is not None:
            return min(1000, max(50, self.messages // 10))
        return 500

    def drain_timeout(self) -> float:
        """How long a burst run waits, after its last send, for its backlog to drain."""
        return max(60.0, 2 * profile_seconds(self.burst or ()))

    def deadline_for(self, kind: Kind) -> float:
        """A caller's deadline: ``deadline``; in a burst, an event chain's caller waits as long as the drain."""
        return self.drain_timeout() if self.burst is not None and kind is Kind.EVENTS else self.deadline

    def public(self) -> dict[str, Any]:
        doc = self.model_dump()
        doc["url"] = redact_url(self.url)
        doc["targets"] = [{"name": name, "urls": [redact_url(u) for u in urls]} for name, urls in self.targets]
        doc["warmup"] = self.warmup_count()
        return doc
