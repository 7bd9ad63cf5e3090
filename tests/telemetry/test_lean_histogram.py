"""Lean histograms leave in every reader's storage what the SDK's ``Histogram.record`` would have: the same
points, counts, buckets, sums, extremes and exemplars, under views, delta and cumulative readers, and a
cardinality limit; and any set-up they cannot stand in for goes to ``record``."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader, MetricsData
from opentelemetry.sdk.metrics.view import (
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
    View,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from amqpkit.telemetry.instruments import RUN, Durations
from amqpkit.telemetry.lean import _release

try:
    from opentelemetry.sdk.metrics import (
        AlwaysOffExemplarFilter,
        AlwaysOnExemplarFilter,
        SimpleFixedSizeExemplarReservoir,
    )

    from amqpkit.telemetry import lean_histogram
except ImportError:  # an SDK release before exemplars (1.28): no lean histograms either
    pytest.skip("this SDK release has no exemplars and no lean histograms", allow_module_level=True)
if _release() not in lean_histogram.SDK_CHECKED:
    pytest.skip("lean histograms are used on the SDK releases they were checked against only", allow_module_level=True)

Setup = Callable[[], tuple[MeterProvider, list[InMemoryMetricReader]]]


def _readers(**limits: Any) -> list[InMemoryMetricReader]:
    """A cumulative reader and a delta one (whose aggregations are replaced at each collection)."""
    return [
        InMemoryMetricReader(**limits),
        InMemoryMetricReader(preferred_temporality={Histogram: AggregationTemporality.DELTA}, **limits),
    ]


def _setup(views: tuple[View, ...] = (), exemplar_filter: Any = None, **limits: Any) -> Setup:
    def make() -> tuple[MeterProvider, list[InMemoryMetricReader]]:
        readers = _readers(**limits)
        kwargs: dict[str, Any] = {"metric_readers": readers, "views": views}
        if exemplar_filter is not None:
            kwargs["exemplar_filter"] = exemplar_filter
        return MeterProvider(**kwargs), readers

    return make


_KEYS_AND_BOUNDARIES = View(
    instrument_name="d", aggregation=ExplicitBucketHistogramAggregation([0.002, 0.01, 0.05]), attribute_keys={"route"}
)
_COARSE = View(instrument_name="d", name="d.coarse", aggregation=ExplicitBucketHistogramAggregation([0.01]))
_RANDOM_RESERVOIR = View(
    instrument_name="d", exemplar_reservoir_factory=lambda _: lambda **_: SimpleFixedSizeExemplarReservoir(4)
)

LEAN = {
    "default": _setup(),
    "filter off": _setup(exemplar_filter=AlwaysOffExemplarFilter()),
    "view: boundaries and keys": _setup((_KEYS_AND_BOUNDARIES,)),
    "view: every set in one point": _setup((View(instrument_name="d", attribute_keys={"messaging.system"}),)),
    "view: no min and max": _setup(
        (View(instrument_name="d", aggregation=ExplicitBucketHistogramAggregation(record_min_max=False)),)
    ),
    "two views": _setup((View(instrument_name="d"), _COARSE)),
    "cardinality limit": _setup(cardinality_limits={Histogram: 2}),
}

NOT_LEAN = {
    "filter always on": _setup(exemplar_filter=AlwaysOnExemplarFilter()),
    "exponential": _setup((View(instrument_name="d", aggregation=ExponentialBucketHistogramAggregation()),)),
    "random reservoir": _setup((_RANDOM_RESERVOIR,)),
}


def _context(rng: random.Random) -> Context:
    """A context with a sampled span, an unsampled one, or none (as a handler's, a dropped trace's, a bare call)."""
    kind = rng.randrange(3)
    if kind == 2:
        return Context()
    span = SpanContext(rng.getrandbits(128) or 1, rng.getrandbits(64) or 1, False, TraceFlags(1 - kind))
    return trace.set_span_in_context(NonRecordingSpan(span), Context())


def _measurements(seed: int, count: int) -> list[tuple[float, dict[str, Any], Context]]:
    rng = random.Random(seed)
    # One dict per attribute set, as amqpkit's routes keep them, and one set twice, in two dicts (a route
    # cache started over); a value on a boundary now and then.
    sets = [{"route": f"r{n}", "messaging.system": "rabbitmq"} for n in (0, 1, 2, 2)]
    return [
        (rng.choice((0.005, 0.01, rng.expovariate(100), rng.random())), rng.choice(sets), _context(rng))
        for _ in range(count)
    ]


def _points(data: MetricsData | None) -> list[tuple[Any, ...]]:
    """Every histogram point's fields but its times, and its exemplars' (value, span, trace, attributes)."""
    found = []
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    exemplars = tuple((e.value, e.span_id, e.trace_id, dict(e.filtered_attributes or {}))
                                      for e in p.exemplars)  # fmt: skip
                    buckets = getattr(p, "bucket_counts", None) or getattr(p, "positive", None)  # explicit, exponential
                    found.append((metric.name, sorted((p.attributes or {}).items()), p.count, p.sum, buckets,
                                  getattr(p, "explicit_bounds", None), p.min, p.max, exemplars))  # fmt: skip
    return sorted(found, key=repr)


def _collect_both(make: Setup, lean_expected: bool) -> Iterator[tuple[list[Any], list[Any]]]:
    """The same measurements through ``record`` and through :class:`Durations`, collected after each batch."""
    sdk_provider, sdk_readers = make()
    lean_provider, lean_readers = make()
    try:
        sdk_histogram = sdk_provider.get_meter("t").create_histogram("d", "s")
        durations = Durations(lean_provider.get_meter("t").create_histogram("d", "s"))
        assert durations.lean is not None
        assert (durations.lean.matches() is not None) is lean_expected
        for seed, count in enumerate((5, RUN * 3 + 7, 1, RUN * 2)):
            for value, attributes, context in _measurements(seed, count):
                sdk_histogram.record(value, attributes, context)
                durations.record(value, attributes, context)
            durations.flush()
            for sdk_reader, lean_reader in zip(sdk_readers, lean_readers, strict=True):
                yield _points(sdk_reader.get_metrics_data()), _points(lean_reader.get_metrics_data())
    finally:
        sdk_provider.shutdown()
        lean_provider.shutdown()


@pytest.mark.parametrize("make", LEAN.values(), ids=list(LEAN))
def test_a_run_merged_leaves_what_record_would(make: Setup) -> None:
    collections = list(_collect_both(make, lean_expected=True))
    assert len(collections) == 8
    exemplars = 0
    for sdk_points, lean_points in collections:
        assert lean_points == sdk_points
        exemplars += sum(len(p[-1]) for p in sdk_points)
    if make is not LEAN["filter off"]:
        assert exemplars > 0  # the comparison covered exemplars, not only empty lists
    if make is LEAN["cardinality limit"]:  # and the overflow point, past the limit
        assert any(("otel.metric.overflow", True) in p[1] for sdk_points, _ in collections for p in sdk_points)


@pytest.mark.parametrize("make", NOT_LEAN.values(), ids=list(NOT_LEAN))
def test_what_it_cannot_stand_in_for_goes_to_record(make: Setup) -> None:
    for sdk_points, lean_points in _collect_both(make, lean_expected=False):
        assert [p[:-1] for p in lean_points] == [p[:-1] for p in sdk_points]  # a random reservoir's picks differ


def test_a_value_record_would_refuse_sends_the_run_to_record(caplog: pytest.LogCaptureFixture) -> None:
    provider, readers = _setup()()
    try:
        durations = Durations(provider.get_meter("t").create_histogram("d", "s"))
        durations.record(0.5, {"k": "v"}, Context())
        durations.record(-1.0, {"k": "v"}, Context())
        durations.flush()
        points = _points(readers[0].get_metrics_data())
        assert [(p[2], p[3]) for p in points] == [(1, 0.5)]
        assert "non-negative" in caplog.text  # the SDK's own warning: the run went through record
    finally:
        provider.shutdown()


def test_the_filter_is_asked_only_for_what_could_be_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Of a run whose every measurement is in a sampled span (every message traced), only the last one per
    bucket can be an exemplar: the SDK's filter (pure: its answer is the context's sampled flag) is asked for
    those, not for all of them. The run still leaves what ``record`` would (the test above)."""
    from opentelemetry.sdk.metrics import TraceBasedExemplarFilter

    asked: list[float] = []
    original = TraceBasedExemplarFilter.should_sample

    def counting(self: Any, value: float, *args: Any) -> bool:
        asked.append(value)
        return original(self, value, *args)

    monkeypatch.setattr(TraceBasedExemplarFilter, "should_sample", counting)
    provider, readers = _setup()()
    try:
        durations = Durations(provider.get_meter("t").create_histogram("d", "s"))
        sampled = trace.set_span_in_context(NonRecordingSpan(SpanContext(7, 8, False, TraceFlags(1))), Context())
        values = [0.001 * (n % 3 + 1) for n in range(RUN)]  # three values, all in the default's first bucket (<= 5)
        for value in values:
            durations.record(value, {"k": "v"}, sampled)
        durations.flush()
        assert asked == [values[-1]]  # the last of the one bucket, asked once for both readers
        points = _points(readers[0].get_metrics_data())
        assert [(p[2], p[-1][0][0]) for p in points] == [(RUN, values[-1])]
    finally:
        provider.shutdown()
