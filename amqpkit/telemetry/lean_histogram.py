"""Lean histograms: a run of durations merged into the SDK's histogram aggregations at once, where that is safe.

One ``Histogram.record`` is some thirty Python calls in the SDK: a ``Measurement`` built and its attributes
cleaned, the exemplar filter asked, the attributes hashed again for every reader, the buckets updated under two
locks, the measurement offered to an exemplar reservoir. In the bench's consuming process that came to 20-30 µs
a message, the largest part of instrumentation there (docs/observability-cost-rounds.md). :class:`LeanHistogram`
takes a run of measurements (:class:`~.instruments.Durations` keeps them) and, for each attribute set and each
of the instrument's aggregations, hashes the attributes once, takes the locks once, adds the run's bucket counts,
sum, minimum and maximum, and offers the reservoir the one measurement per bucket it would have kept.

It is used only where the result is what the SDK's own ``record`` calls, one per measurement in the same order,
would have left in every reader's storage (a test compares the two, point by point, with views, delta and
cumulative readers and exemplars), and hands the run to ``Histogram.record`` otherwise:

- the instrument is the SDK's ``Histogram``, of a release in :data:`SDK_CHECKED` (1.44 keyed and locked its
  aggregations differently; a later release may again), and its meter is enabled;
- the exemplar filter is the SDK's ``TraceBasedExemplarFilter`` (the default) or ``AlwaysOffExemplarFilter``:
  whether a measurement is offered then depends on its context alone (so it is asked, from a run's end, only
  until each bucket has its last passing measurement), and an offered one always names a span;
- every reader's aggregation for the instrument is the SDK's explicit-bucket histogram (the default, or a view's
  with its own boundaries) with the SDK's ``AlignedHistogramBucketExemplarReservoir``, which keeps the last
  measurement offered to each bucket.

The exemplars' timestamps are the time of the merge, not of each measurement, as with any run.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from time import time_ns
from typing import Any

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
        # The exemplar filter (one of the SDK's two, whose answer depends on the measurement alone) is asked only
        # for a measurement that could be offered, and at most once each, whatever the number of readers.
        should_sample = self._consumer._sdk_config.exemplar_filter.should_sample
        now = time_ns()
        answers: dict[int, bool] = {}

        def passes(measured: _Measured) -> bool:
            position, value, attributes, context = measured
            found = answers.get(position)
            if found is None:
                found = answers[position] = should_sample(value, now, attributes, context)
            return found

        # One attribute set per route, each kept as one dict: grouped by identity, in order of first appearance
        # (the order the SDK would make their aggregations in, which matters past a cardinality limit).
        groups: dict[int, list[_Measured]] = {}
        for position, (value, attributes, context) in enumerate(run):
            measured = (position, value, attributes, context)
            group = groups.get(id(attributes))
            if group is None:
                groups[id(attributes)] = [measured]
            else:
                group.append(measured)
        for match in matches:
            keys = match._view._attribute_keys
            # Under the match's lock, as the SDK's own measurement when the match resets on collect: never into
            # an aggregation a collection has just taken away, exemplars included.
            with match._lock:
                # Groups that meet in one aggregation (the same set in two dicts, a view's attribute keys, the
                # overflow past a cardinality limit) are added as one, in run order: the same float sum.
                targets: dict[int, tuple[Any, list[list[_Measured]]]] = {}
                for group in groups.values():
                    attributes = group[0][2]
                    kept = dict(attributes) if keys is None else {k: v for k, v in attributes.items() if k in keys}
                    aggregation = match._get_or_create_aggregation(_hash_attributes(kept), kept)
                    target = targets.get(id(aggregation))
                    if target is None:
                        targets[id(aggregation)] = (aggregation, [group])
                    else:
                        target[1].append(group)
                for aggregation, parts in targets.values():
                    # positions are unique: the sort never compares further than them
                    offers = _add(aggregation, parts[0] if len(parts) == 1 else sorted(m for p in parts for m in p),
                                  passes)  # fmt: skip
                    # The aligned reservoir keeps the last measurement offered to each bucket: only the last one
                    # per bucket that the filter passes is offered.
                    for _, value, attributes, context in offers:
                        aggregation._reservoir.offer(value, now, attributes, context)


_FILTERS = (TraceBasedExemplarFilter, AlwaysOffExemplarFilter)

_Measured = tuple[int, float, Mapping[str, Any], Context]
"""A measurement of a run: its place in the run, value, attributes and context."""


def _add(aggregation: Any, measured: list[_Measured], passes: Callable[[_Measured], bool]) -> list[_Measured]:
    """``measured`` (in run order) into ``aggregation``, as ``record`` would have added them one by one; the last
    measurement per bucket that the exemplar filter ``passes`` is returned, to be offered."""
    boundaries = aggregation._boundaries
    buckets: list[int] = []
    with aggregation._lock:
        counts = aggregation._value
        if counts is None:
            counts = aggregation._value = aggregation._get_empty_bucket_counts()
        total = aggregation._sum
        for measurement in measured:
            value = measurement[1]
            total += value  # one at a time, in order: the same float the SDK's sum would be
            bucket = bisect_left(boundaries, value)
            counts[bucket] += 1
            buckets.append(bucket)
        aggregation._sum = total
        if aggregation._record_min_max:
            aggregation._min = min(aggregation._min, min(m[1] for m in measured))
            aggregation._max = max(aggregation._max, max(m[1] for m in measured))
    # from the end: a bucket's last passing measurement is found, and the ones before it are never asked about
    last: dict[int, _Measured] = {}
    for at in range(len(measured) - 1, -1, -1):
        bucket = buckets[at]
        if bucket not in last and passes(measured[at]):
            last[bucket] = measured[at]
    return list(last.values())
