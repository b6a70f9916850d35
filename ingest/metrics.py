"""Retrieval metrics (pure): nDCG@k as trec_eval computes it, recall@k, MRR, a paired bootstrap.

A ranking is a list of document ids, best first; judgments map a document id to its grade (> 0
means relevant). A query without a relevant judgment has no defined value: callers leave it out.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence

BOOTSTRAP_SAMPLES = 10_000


def dcg(grades: Iterable[float]) -> float:
    """Σ grade_i / log2(i + 1), ranks from 1 (linear gain, as trec_eval / pytrec_eval)."""
    return sum(g / math.log2(i + 2) for i, g in enumerate(grades))


def ndcg(ranked: Sequence[str], judgments: Mapping[str, int], k: int = 10) -> float:
    """Standard nDCG@k: the ideal is the best ordering of every judged document, not only the retrieved."""
    ideal = dcg(sorted((g for g in judgments.values() if g > 0), reverse=True)[:k])
    return dcg(max(judgments.get(d, 0), 0) for d in ranked[:k]) / ideal if ideal > 0 else 0.0


def recall(ranked: Sequence[str], judgments: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents in the top k; 0 when the query has none (callers skip those)."""
    relevant = {d for d, g in judgments.items() if g > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def reciprocal_rank(ranked: Sequence[str], judgments: Mapping[str, int], k: int = 10) -> float:
    """1 / the rank of the first relevant document within the top k, else 0 (MRR@k is its mean)."""
    for rank, doc in enumerate(ranked[:k], start=1):
        if judgments.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 7
) -> tuple[float, float, float]:
    """Mean of b − a over paired queries, with the 95 % percentile interval from resampling queries."""
    if len(a) != len(b):
        raise ValueError("paired scores need the same queries on both sides")
    if not a:
        return math.nan, math.nan, math.nan
    diff = [y - x for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    n = len(diff)
    means = sorted(sum(diff[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return mean(diff), means[int(0.025 * (samples - 1))], means[int(0.975 * (samples - 1))]
