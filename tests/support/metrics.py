"""Reading the metrics the service reports: does a percentile fall in the bucket promised."""

from __future__ import annotations

from collections.abc import Callable

from service.observability.outcomes import (
    bucket_index,
    bucket_range,
)


def in_bucket_of(value: float) -> Callable[[float | None], bool]:
    """True when a reported percentile lies in the bucket holding `value` (the resolution promised)."""
    lower, upper = bucket_range(bucket_index(value))
    return lambda reported: reported is not None and lower <= reported <= upper
