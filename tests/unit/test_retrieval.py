"""Pure parts of retrieval and caching: RRF fusion, filters, snippets and cache keys."""

from __future__ import annotations

import pytest

from service.policy.fusion import RRF_K, rrf
from service.postgres.retrieval import Filters, Source
from service.redis.answer_cache import KeyParts, cache_key, question_hash, scope_key


def test_rrf_sums_reciprocal_ranks_across_lists() -> None:
    fused = dict(rrf([["a", "b", "c"], ["c", "a", "d"]]))
    assert fused["a"] == pytest.approx(1 / (RRF_K + 1) + 1 / (RRF_K + 2))
    assert fused["c"] == pytest.approx(1 / (RRF_K + 3) + 1 / (RRF_K + 1))
    assert fused["d"] == pytest.approx(1 / (RRF_K + 3))
    assert [k for k, _ in rrf([["a", "b", "c"], ["c", "a", "d"]])] == ["a", "c", "b", "d"]


def test_rrf_agreement_beats_a_single_top_rank() -> None:
    # "x" is first in one list only; "y" is second in both: consensus wins
    assert rrf([["x", "y"], ["z", "y"]])[0][0] == "y"


@pytest.mark.parametrize(
    ("rankings", "expected"),
    [
        ([], []),
        ([[]], []),
        ([["a"]], ["a"]),
        ([["a", "b"], []], ["a", "b"]),
        ([["b", "a"], ["a", "b"]], ["b", "a"]),  # exact tie: first appearance (rank, then list) wins
        ([["a", "b"], ["b", "a"]], ["a", "b"]),
    ],
)
def test_rrf_is_deterministic_on_ties_and_empties(rankings: list[list[str]], expected: list[str]) -> None:
    assert [k for k, _ in rrf(rankings)] == expected


def test_rrf_k_damps_the_top() -> None:
    sharp = dict(rrf([["a", "b"]], k=0))
    flat = dict(rrf([["a", "b"]], k=1000))
    assert sharp["a"] / sharp["b"] > flat["a"] / flat["b"]


@pytest.mark.parametrize(
    ("raw", "sources"),
    [(None, ()), ({}, ()), ({"source": "hb"}, ("hb",)), ({"source": ["b", "a", "b"]}, ("a", "b"))],
)
def test_filters_parse(raw: dict[str, object] | None, sources: tuple[str, ...]) -> None:
    assert Filters.parse(raw).sources == sources


@pytest.mark.parametrize("raw", [{"author": "x"}, {"source": []}, {"source": [""]}, {"source": 3}, {"source": [1]}])
def test_filters_reject_what_they_cannot_apply(raw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"filter|source"):
        Filters.parse(raw)


def test_filters_parse_collections_like_sources() -> None:
    assert Filters.parse({"collection": "hr"}).collections == ("hr",)
    both = Filters.parse({"collection": ["b", "a", "b"], "source": "x"})
    assert (both.collections, both.sources) == (("a", "b"), ("x",))


@pytest.mark.parametrize("raw", [{"collection": []}, {"collection": "*"}, {"collection": "a b"}, {"collection": 3}])
def test_filters_reject_what_is_not_a_collection_name(raw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="collection"):
        Filters.parse(raw)


def test_snippet_is_whitespace_folded_and_cut_at_a_word() -> None:
    long = Source(1, 1, 1, "d", "s", "u", "word\n\n" * 200, 0.1)
    assert len(long.snippet()) <= 240 and long.snippet().endswith("…") and "\n" not in long.snippet()
    assert Source(1, 1, 1, "d", "s", "u", "  short   text ", 0.1).snippet() == "short text"


BASE = KeyParts("How do I flush the cache?", 5, Filters(), "auto", 512, 0.2, "1", "p")


def with_(**changes: object) -> KeyParts:
    values = {**BASE.__dict__, **changes}
    return KeyParts(**values)


def test_cache_key_ignores_case_spacing_and_unicode_form() -> None:
    assert cache_key(BASE) == cache_key(with_(question="  how do i FLUSH   the\tcache? "))
    assert cache_key(with_(question="café?")) == cache_key(with_(question="cafe\u0301?"))
    assert len(cache_key(BASE)) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"question": "How do I flush the caches?"},
        {"top_k": 6},
        {"filters": Filters(("handbook",))},
        {"model": "large"},
        {"max_tokens": 256},
        {"temperature": 0.7},
        {"prompt_version": "2"},
        {"permissions": "another permission set"},
    ],
)
def test_everything_that_changes_the_answer_changes_the_key(change: dict[str, object]) -> None:
    assert cache_key(with_(**change)) != cache_key(BASE)


def test_the_permission_set_is_part_of_the_semantic_scope() -> None:
    assert scope_key(with_(permissions="another permission set")) != scope_key(BASE)
    assert scope_key(with_(question="something else")) == scope_key(BASE)


def test_filter_order_does_not_matter_and_question_hash_hides_text() -> None:
    assert cache_key(with_(filters=Filters.parse({"source": ["a", "b"]}))) == cache_key(
        with_(filters=Filters.parse({"source": ["b", "a"]}))
    )
    key = b"k" * 32
    digest = question_hash("How do I flush the cache?", key)
    assert len(digest) == 16 and "flush" not in digest and digest == question_hash("how do i flush the cache?", key)
    assert digest != question_hash("How do I flush the cache?", b"another server's secret")
