"""Fusion of a dense and a full-text ranking: weighted RRF and a convex combination of normalised scores."""

from __future__ import annotations

import pytest

from service.policy.fusion import RRF_K, convex, fuse, min_max, rrf


def test_weighted_rrf_scales_each_list() -> None:
    fused = dict(rrf([["a", "b"], ["b", "a"]], weights=[2.0, 1.0]))
    assert fused["a"] == pytest.approx(2 / (RRF_K + 1) + 1 / (RRF_K + 2))
    assert [k for k, _ in rrf([["a", "b"], ["b", "a"]], weights=[2.0, 1.0])] == ["a", "b"]
    with pytest.raises(ValueError, match="one weight per ranking"):
        rrf([["a"]], weights=[1.0, 1.0])


def test_min_max_maps_onto_the_unit_interval() -> None:
    assert min_max([("a", 0.9), ("b", 0.5), ("c", 0.7)]) == {"a": 1.0, "b": 0.0, "c": pytest.approx(0.5)}
    assert min_max([("a", 0.3), ("b", 0.3)]) == {"a": 1.0, "b": 1.0}
    assert min_max([]) == {}


def test_convex_adds_weighted_normalised_scores_and_missing_items_score_zero() -> None:
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.5)]
    sparse = [("c", 0.4), ("d", 0.1)]
    fused = dict(convex([dense, sparse], [0.7, 0.3]))
    assert fused == pytest.approx({"a": 0.7, "b": 0.7 * 0.75, "c": 0.3, "d": 0.0})


def test_a_strong_dense_list_is_not_dragged_down_by_a_weak_full_text_one() -> None:
    """Equal RRF lets a full-text-only match outrank dense's second; dense weight 0.7 convex keeps dense's order."""
    dense = [("a", 0.90), ("b", 0.89), ("c", 0.60)]
    sparse = [("x", 5.0), ("c", 4.0)]
    assert [k for k, _ in fuse(dense, sparse, fusion="rrf", dense_weight=0.5)][:2] == ["c", "a"]
    assert [k for k, _ in fuse(dense, sparse, fusion="convex", dense_weight=0.7)][:2] == ["a", "b"]


def test_fuse_weight_is_checked_and_dense_weight_one_is_dense() -> None:
    dense = [("a", 0.9), ("b", 0.2)]
    assert [k for k, _ in fuse(dense, [("b", 3.0)], fusion="convex", dense_weight=1.0)] == ["a", "b"]
    with pytest.raises(ValueError, match="dense_weight"):
        fuse(dense, [], fusion="rrf", dense_weight=1.5)
