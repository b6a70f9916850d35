"""rag-eval's pure parts: the BEIR loader (qrels with or without a header, bad input), the metrics, the bootstrap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ingest.beir import BeirError, load, read_qrels
from ingest.metrics import mean, ndcg, paired_bootstrap, recall, reciprocal_rank
from ingest.scratch import beir_documents
from service.settings import Settings

J = {"a": 3, "b": 2, "c": 1, "z": 0}


def beir(folder: Path, qrels: str, queries: list[dict[str, str]] | None = None) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "", "text": "t"}) + "\n")
    rows = queries or [{"_id": "q1", "text": "one"}, {"_id": "q2", "text": "two"}, {"_id": "q3", "text": "three"}]
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text(qrels)
    return folder


def test_ndcg_is_the_standard_formula_on_hand_computed_cases() -> None:
    assert ndcg(["a", "b", "c"], J, 3) == 1.0
    assert math.isclose(ndcg(["c", "x"], J, 2), 1 / (3 + 2 / math.log2(3)))
    assert ndcg(["x", "y"], J, 2) == 0.0
    assert ndcg(["a"], {"a": 0}, 10) == 0.0  # no relevant judgment: 0, not a division by zero


def test_recall_and_reciprocal_rank() -> None:
    assert recall(["a", "z", "c"], J, 3) == 2 / 3
    assert recall(["a", "b", "c"], J, 2) == 2 / 3
    assert recall(["a"], {"a": 0}, 1) == 0.0
    assert reciprocal_rank(["z", "x", "c"], J, 3) == 1 / 3
    assert reciprocal_rank(["z", "x", "c"], J, 2) == 0.0
    assert math.isnan(mean([]))


def test_paired_bootstrap_brackets_the_mean_difference_and_is_deterministic() -> None:
    a = [0.2, 0.4, 0.6, 0.8] * 10
    b = [x + 0.1 for x in a]
    diff, low, high = paired_bootstrap(a, b, samples=500)
    assert diff == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    noisy = paired_bootstrap(a, [0.3, 0.3, 0.7, 0.7] * 10, samples=500)
    assert noisy[1] <= noisy[0] <= noisy[2] and noisy == paired_bootstrap(a, [0.3, 0.3, 0.7, 0.7] * 10, samples=500)
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_qrels_with_a_header_are_read_and_flagged(tmp_path: Path) -> None:
    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq_12\tdoc_0\t1\nq_12\tdoc_1\t2\n")
    assert read_qrels(path) == ({"q_12": {"doc_0": 1, "doc_1": 2}}, True)


def test_qrels_without_a_header_keep_their_first_line_and_trec_columns_work(tmp_path: Path) -> None:
    path = tmp_path / "test.tsv"
    path.write_text("19335\t1720389\t1\n19335\tQ0\t1729\t2\n")
    assert read_qrels(path) == ({"19335": {"1720389": 1, "1729": 2}}, False)


def test_load_keeps_only_queries_with_a_relevant_judgment(tmp_path: Path) -> None:
    dataset = load(beir(tmp_path, "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td1\t0\n"))
    assert [q.id for q in dataset.queries] == ["q1"] and dataset.unjudged == 2 and dataset.qrels_header


@pytest.mark.parametrize(
    ("qrels", "queries", "reason"),
    [
        ("q1\td1\t1\nq1\td2\tx\n", None, r"test.tsv:2: grade 'x' is not an integer"),
        ("q1\td1\n", None, r"test.tsv:1: expected 3 tab-separated columns, got 2"),
        ("", None, r"test.tsv: no judgments"),
        ("q9\td1\t1\n", None, r"test.tsv: no query of queries.jsonl has a relevant judgment"),
        ("q1\td1\t1\n", [{"id": "q1"}], r"queries.jsonl:1: expected an object with _id, text"),
    ],
)
def test_bad_input_names_the_file_and_the_reason(
    tmp_path: Path, qrels: str, queries: list[dict[str, str]] | None, reason: str
) -> None:
    with pytest.raises(BeirError, match=reason):
        load(beir(tmp_path, qrels, queries))


def test_missing_files_and_broken_json_are_named(tmp_path: Path) -> None:
    with pytest.raises(BeirError, match="not a folder"):
        load(tmp_path / "nowhere")
    folder = beir(tmp_path / "set", "q1\td1\t1\n")
    (folder / "queries.jsonl").write_text("{not json\n")
    with pytest.raises(BeirError, match=r"queries.jsonl:1: not JSON"):
        load(folder)
    (folder / "corpus.jsonl").unlink()
    with pytest.raises(BeirError, match=r"corpus.jsonl: missing"):
        load(folder)
    (folder / "corpus.jsonl").write_text("")
    (folder / "qrels" / "test.tsv").unlink()
    with pytest.raises(BeirError, match=r"qrels: no .tsv file"):
        load(folder)


def test_a_line_separator_inside_a_text_does_not_split_the_record(tmp_path: Path) -> None:
    """msmarco-5k's corpus holds U+2028 inside passages; str.splitlines() cut those records in two."""
    folder = beir(tmp_path, "q1\td1\t1\nq2\td1\t1\r\n")
    rows = [{"_id": "q1", "text": "first\u2028second"}, {"_id": "q2", "text": "x\x85y"}]
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    dataset = load(folder)
    assert [q.text for q in dataset.queries] == ["first\u2028second", "x\x85y"]


def test_the_scratch_corpus_is_read_within_the_settings_file_limit(tmp_path: Path) -> None:
    """`--scratch` reads corpus.jsonl as `rag-ingest` does: RAG_INGEST_MAX_FILE_BYTES applies (it was ignored)."""
    corpus = beir(tmp_path / "set", "q1\td1\t1\n") / "corpus.jsonl"
    roomy = Settings(_env_file=None, data_dir=tmp_path / "data")  # type: ignore[call-arg]
    assert [d.external_id for d in beir_documents(roomy, corpus)] == ["d1"]
    tight = roomy.model_copy(update={"ingest_max_file_bytes": 10})
    with pytest.raises(BeirError, match=r"corpus.jsonl: file is \d+ bytes, over the 10 byte limit"):
        beir_documents(tight, corpus)
