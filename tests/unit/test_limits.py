"""Rate-limit arithmetic without Redis: UTC days, seconds to midnight, Retry-After."""

from __future__ import annotations

from service.redis.limits import retry_after, seconds_to_utc_midnight, utc_day


def test_pure_helpers() -> None:
    assert seconds_to_utc_midnight(86_400 * 20_000) == 86_400
    assert seconds_to_utc_midnight(86_400 * 20_000 + 86_399) == 1
    assert utc_day(0) == "19700101" and utc_day(86_400 * 365 - 1) == "19701231"
    assert retry_after(1) == 1 and retry_after(1001) == 2
    assert retry_after(0) == 1  # never tell a client to retry at once
