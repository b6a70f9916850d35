"""Rank fusion (pure): weighted reciprocal rank fusion and a convex combination of normalised scores.

Measured on msmarco-5k and business-reports (docs/benchmarks.md, `rag-eval`), no fusion beat
dense retrieval on both sets with an interval above zero, so dense is the default and hybrid is
opt-in (`RAG_RETRIEVAL_MODE=hybrid`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Literal, TypeVar

K = TypeVar("K", bound=Hashable)
Fusion = Literal["convex", "rrf"]
RRF_K = 60  # the constant from Cormack et al. (2009); damps the weight of top ranks


def _ordered(scores: dict[K, float], first_seen: dict[K, tuple[int, int]]) -> list[tuple[K, float]]:
    """Best first; ties break by first appearance (rank, then list), so the result is deterministic."""
    return sorted(scores.items(), key=lambda kv: (-kv[1], first_seen[kv[0]]))


def rrf(
    rankings: Sequence[Sequence[K]], *, k: int = RRF_K, weights: Sequence[float] | None = None
) -> list[tuple[K, float]]:
    """Reciprocal rank fusion: Σ weight / (k + rank) over the lists an item appears in."""
    if weights is not None and len(weights) != len(rankings):
        raise ValueError("one weight per ranking")
    scores: dict[K, float] = defaultdict(float)
    first_seen: dict[K, tuple[int, int]] = {}
    for list_index, ranking in enumerate(rankings):
        weight = 1.0 if weights is None else weights[list_index]
        for rank, item in enumerate(ranking, start=1):
            scores[item] += weight / (k + rank)
            first_seen.setdefault(item, (rank, list_index))
    return _ordered(scores, first_seen)


def min_max(scored: Sequence[tuple[K, float]]) -> dict[K, float]:
    """Scores mapped onto [0, 1] within their list; a list of equal scores maps to 1."""
    if not scored:
        return {}
    low = min(s for _, s in scored)
    high = max(s for _, s in scored)
    span = high - low
    return {item: (s - low) / span if span > 0 else 1.0 for item, s in scored}


def convex(scored_lists: Sequence[Sequence[tuple[K, float]]], weights: Sequence[float]) -> list[tuple[K, float]]:
    """Σ weight × min-max-normalised score; an item missing from a list scores 0 there.

    Each list is (item, score) best first, scores in any scale (cosine, ts_rank).
    """
    if len(weights) != len(scored_lists):
        raise ValueError("one weight per ranking")
    scores: dict[K, float] = defaultdict(float)
    first_seen: dict[K, tuple[int, int]] = {}
    for list_index, (scored, weight) in enumerate(zip(scored_lists, weights, strict=True)):
        for rank, (item, value) in enumerate(min_max(scored).items(), start=1):
            scores[item] += weight * value
            first_seen.setdefault(item, (rank, list_index))
    return _ordered(scores, first_seen)


def fuse(
    dense: Sequence[tuple[K, float]], sparse: Sequence[tuple[K, float]], *, fusion: Fusion, dense_weight: float
) -> list[tuple[K, float]]:
    """Dense and full-text lists, (item, score) best first, fused with the weight given to dense."""
    if not 0 <= dense_weight <= 1:
        raise ValueError("dense_weight must be within [0, 1]")
    weights = (dense_weight, 1 - dense_weight)
    if fusion == "rrf":  # weights relative to equal RRF: 0.5 each is the classic form, times 2
        return rrf([[i for i, _ in dense], [i for i, _ in sparse]], weights=[2 * w for w in weights])
    return convex([dense, sparse], weights)
