"""What is counted: cache outcomes, latency buckets and percentiles.

Shared by the three users of the numbers: the Prometheus exposition (`prometheus.py`), the
per-minute series in Redis (`series.py`) and the dashboard's read model (`dashboard_model.py`).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping

OUTCOMES = ("hit", "semantic_hit", "coalesced", "miss", "bypass")
AVOIDED = frozenset({"hit", "semantic_hit", "coalesced"})  # answered without a provider call of their own
GENERATED = frozenset({"miss", "bypass"})  # answered by a provider call of their own
ELIGIBLE = ("hit", "semantic_hit", "coalesced", "miss")  # could have been served by the cache (not bypass)
# TTFT/latency classes the dashboard compares; semantic hits replay a stored answer like exact hits.
CLASSES: dict[str, tuple[str, ...]] = {
    "hit": ("hit", "semantic_hit"),
    "miss": ("miss", "bypass"),
    "coalesced": ("coalesced",),
}
ATTEMPT_OUTCOMES = ("ok", "error", "timeout", "retry")

# Fixed log-spaced buckets (ms), identical in every process, so per-minute counts from any
# number of workers add up and p50/p95 come out for any range. Factor 1.25 = at most 25 %
# error before interpolation; 0.1 ms .. ~127 s, then one overflow bucket.
BUCKET_FACTOR = 1.25
BUCKET_BOUNDS_MS: tuple[float, ...] = tuple(0.1 * BUCKET_FACTOR**i for i in range(64))

NANO = 1_000_000_000  # costs are summed as integer nano-dollars: exact across workers, no float drift


def bucket_index(ms: float) -> int:
    """Index of the bucket holding `ms`: the first whose upper bound is >= ms."""
    return bisect_left(BUCKET_BOUNDS_MS, max(ms, 0.0))


def bucket_range(index: int) -> tuple[float, float]:
    """(lower, upper] of a bucket in ms; the overflow bucket's upper bound is infinite."""
    lower = 0.0 if index == 0 else BUCKET_BOUNDS_MS[index - 1]
    upper = BUCKET_BOUNDS_MS[index] if index < len(BUCKET_BOUNDS_MS) else math.inf
    return lower, upper


def percentile(counts: Mapping[int, int], q: float) -> float | None:
    """The q-quantile of bucketed values, interpolated inside its bucket like histogram_quantile."""
    total = sum(c for c in counts.values() if c > 0)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index in sorted(counts):
        count = counts[index]
        if count <= 0:
            continue
        if seen + count >= rank:
            lower, upper = bucket_range(index)
            if math.isinf(upper):
                return round(lower, 3)
            return round(lower + (upper - lower) * (rank - seen) / count, 3)
        seen += count
    return round(bucket_range(max(counts))[0], 3)  # only for q > 1


def hit_ratios(by_outcome: Mapping[str, int], eligible: int) -> dict[str, float]:
    """Shares of `eligible` requests answered from the exact cache, the semantic cache, coalescing, any."""
    hit, semantic, coalesced = (
        by_outcome.get("hit", 0),
        by_outcome.get("semantic_hit", 0),
        by_outcome.get("coalesced", 0),
    )
    return {
        "exact": hit / eligible,
        "semantic": semantic / eligible,
        "coalesced": coalesced / eligible,
        "overall": (hit + semantic + coalesced) / eligible,
    }
