"""The semantic cache's judge (service.policy.semantic_judge): hard vetoes, then a learned score."""

from __future__ import annotations

import dataclasses
import math

import pytest

from service.policy.guardrails import normalize_for_key
from service.policy.semantic_judge import (
    DEFAULT_THRESHOLD,
    FEATURES,
    MIN_COSINE,
    WEIGHTS,
    Judgement,
    judge,
    score,
)
from service.policy.semantic_match import compare, judge_match
from tests.support.near_misses import JUDGE_VETOES


def n(text: str) -> str:
    return normalize_for_key(text)


@pytest.mark.parametrize(("a", "b", "reason"), JUDGE_VETOES)
def test_hard_constraints_veto_whatever_the_cosine(a: str, b: str, reason: str) -> None:
    decision = judge(0.999, n(a), n(b), threshold=0.5)
    assert decision == Judgement(hit=False, similarity=0.999, score=0.0, reason=reason)


def test_a_paraphrase_in_other_words_scores_where_the_old_guard_refused_it() -> None:
    # The cosine all-MiniLM-L6-v2 gives this pair; "people live" / "population" differ as words.
    a, b = n("how many people live in tokyo"), n("what is the population of tokyo")
    assert judge_match(0.914, a, b, threshold=0.70).reason == "guard:content"
    assert judge(0.914, a, b, threshold=0.80).hit  # served at 0.80, the previous default
    # Precision first: the default wants more than that (docs/benchmarks.md); a verifier may serve it.
    assert judge(0.914, a, b, threshold=DEFAULT_THRESHOLD).reason == "below_threshold"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("how do i connect ragcache to postgres", "how do i connect ragcache to mysql"),  # another entity
        ("set the cache ttl in seconds", "set the cache ttl in minutes"),  # another unit
        ("causes of left ventricular hypertrophy", "causes of right ventricular hypertrophy"),
    ],
)
def test_one_substituted_word_in_a_short_question_is_refused_even_at_high_cosine(a: str, b: str) -> None:
    decision = judge(0.98, n(a), n(b), threshold=DEFAULT_THRESHOLD)
    assert decision.hit is False and decision.reason == "below_threshold"
    assert 0.0 < decision.score < DEFAULT_THRESHOLD


def test_below_the_cosine_floor_the_pair_is_not_analysed() -> None:
    a, b = n("how do i flush the cache"), n("how can i flush the cache")
    below = judge(math.nextafter(MIN_COSINE, 0.0), a, b, threshold=0.5)
    assert below == Judgement(hit=False, similarity=below.similarity, score=0.0, reason="below_min_cosine")
    assert judge(0.95, a, b, threshold=0.5).hit


def test_threshold_is_inclusive() -> None:
    a, b = n("how do i flush the cache"), n("how can i flush the cache")
    exact = score(0.9, compare(a, b))
    assert judge(0.9, a, b, threshold=exact).hit
    above = judge(0.9, a, b, threshold=math.nextafter(exact, 1.0))
    assert above.hit is False and above.reason == "below_threshold" and above.score == exact


def test_score_rises_with_the_cosine_and_falls_with_a_substitution() -> None:
    same = compare(n("how do i flush the cache"), n("how can i flush the cache"))
    swapped = compare(n("how do i flush the cache"), n("how do i flush the queue"))
    scores = [score(cosine, same) for cosine in (0.75, 0.85, 0.95, 1.0)]
    assert scores == sorted(scores) and len(set(scores)) == len(scores)
    assert score(0.95, swapped) < score(0.95, same)


def test_identical_questions_are_served_and_non_finite_similarities_never_are() -> None:
    assert judge(1.0, "x", "x", threshold=1.0) == Judgement(hit=True, similarity=1.0, score=1.0, reason="semantic_hit")
    for similarity in (math.nan, math.inf, -math.inf):
        assert judge(similarity, "a b", "a b", threshold=0.5).reason == "invalid_similarity"


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01, math.nan])
def test_invalid_threshold_is_refused(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        judge(0.9, "a", "b", threshold=threshold)


def test_model_shape_and_default_threshold() -> None:
    assert len(WEIGHTS) == len(FEATURES)
    assert 0.5 <= DEFAULT_THRESHOLD < 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        judge(0.9, "a", "a", threshold=0.8).hit = False  # type: ignore[misc]
