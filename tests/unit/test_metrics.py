"""Metrics maths without Redis: latency buckets and percentiles."""

from __future__ import annotations

from service.observability.outcomes import (
    BUCKET_BOUNDS_MS,
    bucket_index,
    bucket_range,
    percentile,
)
from tests.support.metrics import in_bucket_of


def test_buckets_and_percentiles() -> None:
    assert bucket_index(0) == 0 and bucket_index(0.1) == 0
    assert bucket_index(BUCKET_BOUNDS_MS[-1] * 10) == len(BUCKET_BOUNDS_MS)  # the overflow bucket
    for value in (0.3, 1.0, 42.0, 999.0, 60_000.0):
        lower, upper = bucket_range(bucket_index(value))
        assert lower < value <= upper and upper / lower <= 1.25 + 1e-9
    counts: dict[int, int] = {}
    for ms in range(1, 101):  # 1..100 ms, one each
        counts[bucket_index(ms)] = counts.get(bucket_index(ms), 0) + 1
    assert in_bucket_of(50)(percentile(counts, 0.5))
    assert in_bucket_of(95)(percentile(counts, 0.95))
    assert percentile({}, 0.5) is None
