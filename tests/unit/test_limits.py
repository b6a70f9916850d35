"""Rate-limit arithmetic without Redis: UTC days, seconds to midnight, Retry-After, settled reservations."""

from __future__ import annotations

from service.redis.limits import retry_after, seconds_to_utc_midnight, settled_charge, utc_day


def test_pure_helpers() -> None:
    assert seconds_to_utc_midnight(86_400 * 20_000) == 86_400
    assert seconds_to_utc_midnight(86_400 * 20_000 + 86_399) == 1
    assert utc_day(0) == "19700101" and utc_day(86_400 * 365 - 1) == "19701231"
    assert retry_after(1) == 1 and retry_after(1001) == 2
    assert retry_after(0) == 1  # never tell a client to retry at once


def test_a_settled_reservation_charges_the_spend_never_more_than_reserved() -> None:
    assert settled_charge(120, 800) == 120  # the rest goes back to the budget
    assert settled_charge(900, 800) == 800  # a provider that overran max_tokens: capped
    assert settled_charge(0, 800) == 0 and settled_charge(-5, 800) == 0
    assert settled_charge(120, 0) == 120  # nothing reserved (Redis was away): charged as spent
