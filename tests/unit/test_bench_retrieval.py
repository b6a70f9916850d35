"""bench.retrieval's metric formulas and its handling of data sets other than msmarco-5k."""

from __future__ import annotations

import math
from pathlib import Path

from bench.retrieval import (
    LEADERBOARD,
    Query,
    leaderboard_for,
    ndcg_leaderboard,
    ndcg_standard,
    oracle_recall,
    precision,
    read_qrels,
    recall,
    reciprocal_rank,
)

J = {"a": 3, "b": 2, "c": 1, "z": 0}


def test_ndcg_formulas_on_hand_computed_cases() -> None:
    assert ndcg_standard(["a", "b", "c"], J, 3) == 1.0
    assert math.isclose(ndcg_standard(["c", "x"], J, 2), 1 / (3 + 2 / math.log2(3)))
    assert ndcg_leaderboard(["c", "x"], J, 2) == 1.0  # only one judged passage retrieved: "ideal"
    assert math.isclose(ndcg_leaderboard(["x", "a", "b"], J, 3), (3 / math.log2(3) + 1) / (3 + 2 / math.log2(3)))
    assert ndcg_leaderboard(["x", "y"], J, 2) == 0.0


def test_recall_mrr_and_precision() -> None:
    assert recall(["a", "z", "c"], J, 3, 1) == 2 / 3
    assert recall(["a", "z", "c"], J, 3, 2) == 1 / 2
    assert reciprocal_rank(["z", "x", "c"], J, 3) == 1 / 3
    assert reciprocal_rank(["z"], J, 1) == 0.0
    assert precision(["a", "z", "x", "b"], J, 4) == 0.5


def test_recall_at_a_grade_no_judgment_has_is_undefined_not_zero() -> None:
    assert math.isnan(recall(["a"], {"a": 1}, 1, 2))


def test_oracle_recall_skips_queries_without_a_judgment_at_the_grade() -> None:
    """business-reports grades everything 1: recall at grade 2 used to divide by zero and lose the run."""
    only_ones = [Query("q1", "x", {"a": 1, "b": 1}), Query("q2", "y", {"c": 1})]
    assert math.isnan(oracle_recall(only_ones, 10, 2))
    mixed = [*only_ones, Query("q3", "z", {f"d{i}": 2 for i in range(20)})]
    assert oracle_recall(mixed, 10, 2) == 0.5
    assert oracle_recall(mixed, 10, 1) == (1 + 1 + 0.5) / 3


def test_qrels_with_a_header_are_read_and_flagged(tmp_path: Path) -> None:
    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq_12\tdoc_0\t1\nq_12\tdoc_1\t2\n")
    qrels, first, header = read_qrels(path)
    assert qrels == {"q_12": {"doc_0": 1, "doc_1": 2}}
    assert first == ("q_12", "doc_0")
    assert header


def test_qrels_without_a_header_keep_their_first_line(tmp_path: Path) -> None:
    path = tmp_path / "test.tsv"
    path.write_text("19335\t1720389\t1\n19335\t1729\t2\n")
    qrels, _, header = read_qrels(path)
    assert qrels == {"19335": {"1720389": 1, "1729": 2}}
    assert not header


def test_leaderboard_figures_only_for_msmarco_5k(tmp_path: Path) -> None:
    assert leaderboard_for(tmp_path / "msmarco-5k") == LEADERBOARD
    assert leaderboard_for(tmp_path / "business-reports") == {}
