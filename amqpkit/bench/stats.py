"""Latency recording with an HDR histogram (microsecond resolution, 3 significant digits)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ["LatencyRecorder", "Percentiles"]

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # an hour: nothing a benchmark sees is slower
SIGNIFICANT_DIGITS = 3


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Latency percentiles in microseconds."""

    p50: int
    p90: int
    p99: int
    p999: int
    max: int

    def as_dict(self) -> dict[str, int]:
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99, "p999": self.p999, "max": self.max}


class LatencyRecorder:
    """Records latencies (nanoseconds in, microseconds stored); merges with others; travels as text."""

    def __init__(self) -> None:
        self.histogram: Any = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)

    def record_ns(self, nanoseconds: int) -> None:
        self.histogram.record_value(min(max(nanoseconds // 1000, LOWEST_US), HIGHEST_US))

    @property
    def count(self) -> int:
        return int(self.histogram.get_total_count())

    def merge(self, other: LatencyRecorder) -> None:
        self.histogram.add(other.histogram)

    def encode(self) -> str:
        return bytes(self.histogram.encode()).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> LatencyRecorder:
        recorder = cls()
        if text:
            recorder.histogram.decode_and_add(text.encode("ascii"))
        return recorder

    def percentiles(self) -> Percentiles:
        h = self.histogram
        if self.count == 0:
            return Percentiles(0, 0, 0, 0, 0)
        return Percentiles(
            p50=int(h.get_value_at_percentile(50)),
            p90=int(h.get_value_at_percentile(90)),
            p99=int(h.get_value_at_percentile(99)),
            p999=int(h.get_value_at_percentile(99.9)),
            max=int(h.get_max_value()),
        )
