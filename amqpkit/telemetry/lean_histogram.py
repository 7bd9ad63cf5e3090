"""Lean histograms: a run of durations merged into the SDK's histogram aggregations at once, where that is safe.

One ``Histogram.record`` is some thirty Python calls in the SDK: a ``Measurement`` built and its attributes
cleaned, the exemplar filter asked, the attributes hashed again for every reader, the buckets updated under two
locks, the measurement offered to an exemplar reservoir. In the bench's consuming process that came to 20-30 µs
a message, the largest part of instrumentation there (patterns/observability.md, Cost). :class:`LeanHistogram`
takes a run of measurements (:class:`~.instruments.Durations` keeps them) and, for each attribute set and each
of the instrument's aggregations, hashes the attributes once, takes the locks once, adds the run's bucket counts,
sum, minimum and maximum, and offers the reservoir the one measurement per bucket it would have kept.

It is used only where the result is what the SDK's own ``record`` calls, one per measurement in the same order,
would have left in every reader's storage (a test compares the two, point by point, with views, delta and
cumulative readers and exemplars), and hands the run to ``Histogram.record`` otherwise:

- the instrument is the SDK's ``Histogram``, of a release in :data:`SDK_CHECKED` (1.44 keyed and locked its
  aggregations differently; a later release may again), and its meter is enabled;
- the exemplar filter is the SDK's ``TraceBasedExemplarFilter`` (the default) or ``AlwaysOffExemplarFilter``:
  whether a measurement is offered then depends on its context alone, and an offered one always names a span;
- every reader's aggregation for the instrument is the SDK's explicit-bucket histogram (the default, or a view's
  with its own boundaries) with the SDK's ``AlignedHistogramBucketExemplarReservoir``, which keeps the last
  measurement offered to each bucket.

The exemplars' timestamps are the time of the merge, not of each measurement, as with any run.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from time import time_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import (
    AlignedHistogramBucketExemplarReservoir,
    AlwaysOffExemplarFilter,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics._internal import instrument as sdk_instrument
from opentelemetry.sdk.metrics._internal._view_instrument_match import _hash_attributes, _ViewInstrumentMatch
from opentelemetry.sdk.metrics._internal.aggregation import _ExplicitBucketHistogramAggregation
from opentelemetry.sdk.metrics._internal.measurement_consumer import SynchronousMeasurementConsumer

from .lean import _release

SDK_CHECKED = ((1, 45),)
"""The opentelemetry-sdk releases (major, minor) lean histograms were checked against; others get ``record``."""

_MATCH_NEEDS = ("_view", "_lock", "_aggregation", "_get_or_create_aggregation")
_AGGREGATION_NEEDS = ("_lock", "_value", "_sum", "_min", "_max", "_record_min_max", "_boundaries", "_reservoir",
                      "_get_empty_bucket_counts")  # fmt: skip

Run = Sequence[tuple[float, Mapping[str, Any], Context]]
"""Measurements in the order they were made: (value, attributes, context)."""


def lean_histogram(histogram: Any) -> LeanHistogram | None:
    """A :class:`LeanHistogram` for ``histogram``, or None when it is not the SDK's (or not a release checked)."""
    if type(histogram) is not sdk_instrument._Histogram or _release() not in SDK_CHECKED:
        return None
    consumer = getattr(histogram, "_measurement_consumer", None)
    if type(consumer) is not SynchronousMeasurementConsumer or not hasattr(histogram, "_is_enabled"):
        return None
    if not all(hasattr(consumer, name) for name in ("_reader_storages", "_sdk_config")):
        return None
    return LeanHistogram(histogram, consumer)


class LeanHistogram:
    """Merges runs of measurements into one SDK histogram's aggregations (see the module's notes)."""

    def __init__(self, histogram: Any, consumer: SynchronousMeasurementConsumer) -> None:
        self.histogram = histogram
        self._consumer: Any = consumer

    def matches(self) -> list[_ViewInstrumentMatch] | None:
        """The instrument's view matches in every reader's storage, or None when a run must go to ``record``.

        Asked for each run: readers are added and removed, and a storage makes its matches on first use.
        """
        if not self.histogram._is_enabled() or type(self._consumer._sdk_config.exemplar_filter) not in _FILTERS:
            return None
        found: list[_ViewInstrumentMatch] = []
        for storage in self._consumer._reader_storages.values():
            for match in storage._get_or_init_view_instrument_match(self.histogram):
                template = getattr(match, "_aggregation", None)
                if (not all(hasattr(match, name) for name in _MATCH_NEEDS)
                        or type(template) is not _ExplicitBucketHistogramAggregation
                        or not all(hasattr(template, name) for name in _AGGREGATION_NEEDS)
                        or type(template._reservoir) is not AlignedHistogramBucketExemplarReservoir):  # fmt: skip
                    return None
                found.append(match)
        return found

    def merge(self, run: Run, matches: list[_ViewInstrumentMatch]) -> None:
        """Add ``run`` (finite, non-negative values) to each of ``matches`` (from :meth:`matches`)."""
        # One attribute set per route, each kept as one dict: group by identity, keeping the run's order.
        groups: dict[int, tuple[Mapping[str, Any], list[float], list[Context]]] = {}
        for value, attributes, context in run:
            group = groups.get(id(attributes))
            if group is None:
                group = groups[id(attributes)] = (attributes, [], [])
            group[1].append(value)
            group[2].append(context)
        offers = type(self._consumer._sdk_config.exemplar_filter) is TraceBasedExemplarFilter
        now = time_ns()
        for match in matches:
            keys = match._view._attribute_keys
            for attributes, values, contexts in groups.values():
                kept = dict(attributes) if keys is None else {k: v for k, v in attributes.items() if k in keys}
                _merge(match, _hash_attributes(kept), kept, attributes, values, contexts if offers else None, now)


_FILTERS = (TraceBasedExemplarFilter, AlwaysOffExemplarFilter)


def _merge(
    match: Any,
    key: Any,
    kept: dict[str, Any],
    attributes: Mapping[str, Any],
    values: list[float],
    contexts: list[Context] | None,
    now: int,
) -> None:
    """One attribute set's values into ``match``'s aggregation, as ``record`` would have added them one by one."""
    with match._lock:  # as the SDK's own measurement when the match resets on collect: never a discarded one
        aggregation = match._get_or_create_aggregation(key, kept)
        boundaries = aggregation._boundaries
        last: dict[int, int] = {}  # bucket -> the position of the last value in it that the filter passes
        with aggregation._lock:
            counts = aggregation._value
            if counts is None:
                counts = aggregation._value = aggregation._get_empty_bucket_counts()
            total = aggregation._sum
            for position, value in enumerate(values):
                total += value  # one at a time, in order: the same float the SDK's sum would be
                bucket = bisect_left(boundaries, value)
                counts[bucket] += 1
                if contexts is not None and _sampled(contexts[position]):
                    last[bucket] = position
            aggregation._sum = total
            if aggregation._record_min_max:
                aggregation._min = min(aggregation._min, min(values))
                aggregation._max = max(aggregation._max, max(values))
        # The aligned reservoir keeps the last measurement offered to each bucket: the rest need not be offered.
        for position in sorted(last.values()):
            aggregation._reservoir.offer(values[position], now, attributes, contexts[position])  # type: ignore[index]


def _sampled(context: Context) -> bool:
    """What ``TraceBasedExemplarFilter.should_sample`` says for a measurement made in ``context``."""
    span = trace.get_current_span(context)
    if span == trace.INVALID_SPAN:
        return False
    return bool(span.get_span_context().trace_flags.sampled)
