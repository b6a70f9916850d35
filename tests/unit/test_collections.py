"""Permission sets: what a request may read, and the cache unit it is (service/policy/collections.py)."""

from __future__ import annotations

import pytest

from service.policy.collections import (
    ALL,
    CollectionForbiddenError,
    PermissionSet,
    metric_labels,
    parse_grant,
    permission_set,
)


def test_a_grant_is_sorted_deduplicated_and_star_stands_alone() -> None:
    assert parse_grant("hr, handbook,hr") == ("handbook", "hr")
    assert parse_grant(["b", "a"]) == ("a", "b")
    assert parse_grant("*") == (ALL,)
    for bad in ("", " , ", "*,hr", "h r", "../x", "x" * 65):
        with pytest.raises(ValueError):
            parse_grant(bad)


def test_without_a_filter_a_request_reads_what_its_key_may() -> None:
    assert permission_set(["hr", "handbook"]).collections == ("handbook", "hr")
    assert permission_set(["*"]).everything and permission_set(["*"]).names is None


def test_a_filter_narrows_within_the_grant_and_is_refused_outside_it() -> None:
    assert permission_set(["hr", "handbook"], ["hr"]).names == ("hr",)
    with pytest.raises(CollectionForbiddenError):
        permission_set(["hr"], ["finance"])
    with pytest.raises(CollectionForbiddenError):  # one forbidden name refuses the whole filter
        permission_set(["hr"], ["hr", "finance"])
    assert permission_set(["*"], ["finance"]).names == ("finance",)  # `*` may read any collection


def test_equal_sets_share_a_token_and_different_ones_never_do() -> None:
    a_b = permission_set(["a", "b"])
    assert a_b.token == permission_set(["b", "a", "a"]).token  # order and repeats do not matter
    assert a_b.token == permission_set(["*"], ["b", "a"]).token  # an admin filtered to {a, b} reads {a, b}
    tokens = {p.token for p in (a_b, permission_set(["a"]), permission_set(["b"]), permission_set(["*"]))}
    assert len(tokens) == 4
    # `*` is its own token: "every collection, also future ones" is never "the ones there are now"
    assert PermissionSet((ALL,)).token != PermissionSet(("a", "b")).token
    # names cannot collide by concatenation
    assert PermissionSet(("ab",)).token != PermissionSet(("a", "b")).token


def test_metric_labels_are_bounded_by_the_configured_list() -> None:
    assert metric_labels(["hr", "secret-1", "secret-2"], {"hr", "default"}) == ("hr", "other")
    assert metric_labels(["*"], {"hr"}) == ("all",)
    assert metric_labels([], {"hr"}) == ()
