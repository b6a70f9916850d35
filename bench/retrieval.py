"""Retrieval quality on a BEIR data set: dense, full-text and hybrid, plus HNSW recall.

    python -m bench.retrieval DATA_DIR [--top-k 10] [--ef-search 100] [--keep DIR]

DATA_DIR holds `corpus.jsonl`, `queries.jsonl` and `qrels/test.tsv` (query-id, corpus-id,
grade; no header). The corpus is ingested exactly as `rag-ingest add corpus.jsonl --format
beir` would (same loader, chunker, embedder and store) into a fresh embedded Postgres in a
temp dir, or into `--keep DIR`, where a later run finds every document unchanged and skips
the embedding. Each judged query is embedded the way the answer path does it (one
`embed([question])` call) and retrieved through the service's own `Retriever.search` in its
three modes; chunks map to their document's BEIR `_id` (`documents.external_id`) and are
de-duplicated by document.

Metrics at k (all averaged over the queries that have at least one judgment):

- nDCG@k, standard (BEIR / pytrec_eval `ndcg_cut`): DCG = Σ_{i=1..k} grade_i / log2(i + 1),
  unjudged = 0; the ideal DCG sorts *all* judged grades of the query and takes the top k.
- nDCG@k, leaderboard: the same DCG, but the ideal ranking is the retrieved top k's own
  grades sorted descending (0 when none of them is judged). This is the formula of the public
  embedding leaderboard the data set comes from; it only scores the order of what was
  retrieved, not what was missed, so it is always ≥ the standard value.
- recall@k: |top k ∩ {grade ≥ t}| / |{grade ≥ t}| for t = 1 (headline) and t = 2 (the
  usual TREC-DL binarisation for passage ranking).
- MRR@k: 1 / rank of the first passage with grade ≥ 1 in the top k, 0 if there is none.
- P@k: passages with grade ≥ 1 in the top k, divided by k.

HNSW recall@k: the index's top k (plain `ORDER BY embedding <=> q LIMIT k`, with
`hnsw.ef_search` and `enable_seqscan = off` set per transaction so the index is really used)
against the exact top k (the same SQL with index scans disabled, i.e. a sequential scan over
every cosine distance), as mean overlap over all queries in queries.jsonl; next to it, the
service's dense mode as deployed (a pool from `create_pool(ef_search=…)`) and the ef_search
its pooled connection actually has after use.

Full-text and fusion variants (AND vs OR of the query terms, `ts_rank` vs `ts_rank_cd`) run
as the bench's own SQL, as diagnostics; the service's fusion is re-built from them and checked
against `Retriever.search` query by query.

The benchmark data lives outside the project (`../shared`); only this script reads it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import numpy as np
import numpy.typing as npt
from pgvector.asyncpg import register_vector

from bench.common import cpu_model, load_text, make_settings, nproc, say
from ingest.loaders import LoadFailure, SourceDocument, discover, load
from ingest.pipeline import IngestOptions, IngestReport, ingest_documents
from service.embedded import start_postgres
from service.embeddings.encoders import LocalEmbedder
from service.postgres.corpus import open_corpus
from service.postgres.db import create_pool
from service.postgres.retrieval import RRF_K, Mode, Retriever, rrf

Vector = npt.NDArray[np.float32]
Judgments = dict[str, int]  # corpus id -> grade
T = TypeVar("T")

LEADERBOARD = {  # nDCG@10, ideal ranking from the retrieved list, exact cosine search over the whole subset
    "text-embedding-3-large": 0.947,
    "text-embedding-3-small": 0.946,
    "voyage-3-large": 0.942,
}
EF_SWEEP = (10, 20, 40, 100, 200)
BOOTSTRAP_SAMPLES = 10_000
SERVICE_CANDIDATES = 40  # Retriever's default candidate list per ranking


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    judgments: Judgments


@dataclass
class Dataset:
    path: Path
    queries: list[Query]  # every query in queries.jsonl, judged or not
    judgments: int
    first_qrels_line: tuple[str, str] | None = None

    @property
    def judged(self) -> list[Query]:
        return [q for q in self.queries if q.judgments]


def read_qrels(path: Path) -> tuple[dict[str, Judgments], tuple[str, str] | None]:
    """BEIR qrels: `query-id <TAB> corpus-id <TAB> grade`; a header line, if any, is skipped."""
    qrels: dict[str, Judgments] = {}
    first: tuple[str, str] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) == 4:  # TREC style: query-id, iteration, corpus-id, grade
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise SystemExit(f"{path}:{number}: expected 3 tab-separated columns, got {len(parts)}")
        query_id, corpus_id, grade = parts
        try:
            value = int(grade)
        except ValueError:
            if number == 1:  # "query-id corpus-id score"
                continue
            raise SystemExit(f"{path}:{number}: grade {grade!r} is not an integer") from None
        qrels.setdefault(query_id, {})[corpus_id] = value
        if first is None:
            first = (query_id, corpus_id)
    return qrels, first


def load_dataset(data_dir: Path) -> Dataset:
    qrels, first = read_qrels(data_dir / "qrels" / "test.tsv")
    queries = []
    for line in (data_dir / "queries.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            query_id = str(record["_id"])
            queries.append(Query(query_id, str(record["text"]), qrels.get(query_id, {})))
    return Dataset(data_dir, queries, sum(len(j) for j in qrels.values()), first)


def load_corpus(corpus: Path) -> list[SourceDocument | LoadFailure]:
    """discover + load, exactly as `rag-ingest add CORPUS --format beir` does."""
    entries, failures = discover([str(corpus)])
    items: list[SourceDocument | LoadFailure] = list(failures)
    for entry in entries:
        items.extend(load(entry, "beir"))
    return items


# --------------------------------------------------------------------------- metrics


def dcg(grades: Iterable[float]) -> float:
    """Σ grade_i / log2(i + 1), ranks from 1 (linear gain, as trec_eval / pytrec_eval)."""
    return sum(g / math.log2(i + 2) for i, g in enumerate(grades))


def ndcg_standard(ranked: Sequence[str], judgments: Mapping[str, int], k: int) -> float:
    ideal = dcg(sorted((g for g in judgments.values() if g > 0), reverse=True)[:k])
    return dcg(max(judgments.get(d, 0), 0) for d in ranked[:k]) / ideal if ideal > 0 else 0.0


def ndcg_leaderboard(ranked: Sequence[str], judgments: Mapping[str, int], k: int) -> float:
    grades = [judgments.get(d, 0) for d in ranked[:k]]
    ideal = dcg(sorted(grades, reverse=True))
    return dcg(grades) / ideal if ideal > 0 else 0.0


def recall(ranked: Sequence[str], judgments: Mapping[str, int], k: int, min_grade: int) -> float:
    relevant = {d for d, g in judgments.items() if g >= min_grade}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def reciprocal_rank(ranked: Sequence[str], judgments: Mapping[str, int], k: int, min_grade: int = 1) -> float:
    for rank, doc in enumerate(ranked[:k], start=1):
        if judgments.get(doc, 0) >= min_grade:
            return 1.0 / rank
    return 0.0


def precision(ranked: Sequence[str], judgments: Mapping[str, int], k: int, min_grade: int = 1) -> float:
    return sum(1 for d in ranked[:k] if judgments.get(d, 0) >= min_grade) / k


METRICS: dict[str, Callable[[Sequence[str], Mapping[str, int], int], float]] = {
    "nDCG@k": ndcg_standard,
    "nDCG@k (leaderboard)": ndcg_leaderboard,
    "recall@k (≥1)": lambda r, j, k: recall(r, j, k, 1),
    "recall@k (≥2)": lambda r, j, k: recall(r, j, k, 2),
    "MRR@k (≥1)": reciprocal_rank,
    "P@k (≥1)": precision,
}


def _self_check() -> None:
    """The formulas on hand-computed cases, so a refactor cannot silently change them."""
    j = {"a": 3, "b": 2, "c": 1, "z": 0}
    assert ndcg_standard(["a", "b", "c"], j, 3) == 1.0
    assert ndcg_leaderboard(["c", "x"], j, 2) == 1.0  # only one judged passage retrieved: "ideal"
    assert math.isclose(ndcg_standard(["c", "x"], j, 2), 1 / (3 + 2 / math.log2(3)))
    assert math.isclose(ndcg_leaderboard(["x", "a", "b"], j, 3), (3 / math.log2(3) + 1) / (3 + 2 / math.log2(3)))
    assert ndcg_leaderboard(["x", "y"], j, 2) == 0.0
    assert recall(["a", "z", "c"], j, 3, 1) == 2 / 3 and recall(["a", "z", "c"], j, 3, 2) == 1 / 2
    assert reciprocal_rank(["z", "x", "c"], j, 3) == 1 / 3 and reciprocal_rank(["z"], j, 1) == 0.0
    assert precision(["a", "z", "x", "b"], j, 4) == 0.5


@dataclass
class Run:
    """One retrieval method over the judged queries: ranked corpus ids and latency per query."""

    name: str
    ranked: dict[str, list[str]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    note: str = ""

    def per_query(self, metric: str, queries: Sequence[Query], k: int) -> list[float]:
        fn = METRICS[metric]
        return [fn(self.ranked[q.id], q.judgments, k) for q in queries]

    def mean(self, metric: str, queries: Sequence[Query], k: int) -> float:
        return statistics.fmean(self.per_query(metric, queries, k))

    def short(self, k: int) -> int:
        """Queries for which fewer than k passages came back."""
        return sum(1 for ranked in self.ranked.values() if len(ranked) < k)

    @property
    def ms(self) -> float:
        return 1000 * statistics.median(self.seconds) if self.seconds else float("nan")


def paired_bootstrap(a: Sequence[float], b: Sequence[float], seed: int = 7) -> tuple[float, float, float]:
    """Mean of b - a with a 95% percentile interval from resampling the queries."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(BOOTSTRAP_SAMPLES, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


# --------------------------------------------------------------------------- retrieval

_DENSE_SQL = "SELECT id, document_id FROM chunks ORDER BY embedding <=> $1 LIMIT $2"

# Full-text variants (diagnostics only; the service's own query runs through Retriever.search).
_TSQUERY = {
    "and": "websearch_to_tsquery('english', $1)",
    "or": "replace(websearch_to_tsquery('english', $1)::text, ' & ', ' | ')::tsquery",
}
_SPARSE_SQL = """
WITH q AS (SELECT {tsquery} AS query)
SELECT c.id, c.document_id FROM chunks c, q
WHERE numnode(q.query) > 0 AND c.tsv @@ q.query
ORDER BY {rank}(c.tsv, q.query) DESC, c.id LIMIT $2
"""


def dedupe(ids: Iterable[T]) -> list[T]:
    return list(dict.fromkeys(ids))


class Evaluator:
    def __init__(self, doc_ids: dict[int, str], k: int) -> None:
        self.doc_ids = doc_ids  # documents.id -> BEIR _id
        self.k = k
        self.chunk_docs: dict[int, int] = {}
        self.refetches = 0

    async def service_ranking(self, retriever: Retriever, vector: Vector, question: str, mode: Mode) -> list[str]:
        """The service's ranking, chunk → document, de-duplicated; asks for more if a document repeats."""
        top = self.k
        while True:
            sources = await retriever.search(vector, question, top_k=top, mode=mode)
            ranked = dedupe(self.doc_ids[s.document_id] for s in sources)
            if len(ranked) >= self.k or len(sources) < top:
                return ranked[: self.k]
            self.refetches += 1
            top *= 2

    async def chunk_ranking(self, conn: asyncpg.Connection, sql: str, *args: Any) -> list[int]:
        rows = await conn.fetch(sql, *args)
        for row in rows:
            self.chunk_docs[row["id"]] = row["document_id"]
        return [row["id"] for row in rows]

    async def exact_chunks(self, conn: asyncpg.Connection, vector: Vector, limit: int) -> list[int]:
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_indexscan = off")
            return await self.chunk_ranking(conn, _DENSE_SQL, vector, limit)

    def documents(self, chunk_ids: Iterable[int]) -> list[str]:
        return dedupe(self.doc_ids[self.chunk_docs[c]] for c in chunk_ids)[: self.k]


async def plan_of(conn: asyncpg.Connection, sql: str, *args: Any, settings: Sequence[str] = ()) -> str:
    """The scan nodes Postgres chose, e.g. 'Index Scan using chunks_embedding_hnsw on chunks'."""
    async with conn.transaction():
        for setting in settings:
            await conn.execute(f"SET LOCAL {setting}")
        rows = await conn.fetch("EXPLAIN " + sql, *args)
    lines = [r[0].strip().lstrip("-> ").split("  (")[0] for r in rows]
    return "; ".join(line for line in lines if "Scan" in line)


# --------------------------------------------------------------------------- the run


@dataclass
class HnswPoint:
    ef_search: int
    overlap: float  # HNSW (index forced) top k vs exact top k, mean over queries
    perfect: int  # queries whose HNSW top k is exactly the exact top k
    ms_p50: float
    ms_p95: float
    planner: str  # what Postgres picks for the plain query at this ef_search when left alone
    service_overlap: float  # the service's dense mode, as the planner runs it, vs exact
    service_ms_p50: float  # Retriever.search (dense mode): its SQL also runs the full-text part
    service_ef: str  # hnsw.ef_search on the service's pooled connection after use


@dataclass
class Results:
    command: str
    dataset: Dataset
    k: int
    ef_search: int
    documents: int
    chunks: int
    ingest: IngestReport
    ingest_seconds: float
    embed_ms: float
    runs: dict[str, Run]
    diagnostics: dict[str, Run]
    hnsw: list[HnswPoint]
    exact_plan: str
    exact_ms_p50: float
    in_effect: dict[str, str]
    refetches: int
    hybrid_agreement: int
    machine: dict[str, str]


def _ms(seconds: Sequence[float], q: float) -> float:
    return 1000 * float(np.percentile(np.asarray(seconds), q))


async def evaluate(args: argparse.Namespace, command: str) -> Results:
    _self_check()
    dataset = load_dataset(args.data_dir)
    judged = dataset.judged
    say(f"{args.data_dir}: {len(dataset.queries)} queries, {len(judged)} with judgments, {dataset.judgments} judgments")
    items = load_corpus(args.data_dir / "corpus.jsonl")
    failures = [i for i in items if isinstance(i, LoadFailure)]
    if failures:
        raise SystemExit(f"{len(failures)} load failures, first: {failures[0]}")
    corpus_ids = {i.external_id for i in items if isinstance(i, SourceDocument)}

    work = args.keep or Path(tempfile.mkdtemp(prefix="ragbench-retrieval-"))
    pg = start_postgres(work)
    try:
        settings = make_settings(pg.url, None, work)
        embedder = LocalEmbedder(batch_size=settings.embed_batch_size)
        options = IngestOptions(settings.chunk_tokens, settings.chunk_overlap, settings.embed_batch_size)
        started = time.perf_counter()
        async with open_corpus(settings) as corpus:  # migrates a fresh database
            report = await ingest_documents(corpus.store, embedder, items, options)
        ingest_seconds = time.perf_counter() - started
        say(
            f"ingest: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
            f"{report.chunks} chunks written, {ingest_seconds:.1f}s ({work})"
        )
        del items
        return await _measure(args, command, pg.url, dataset, corpus_ids, embedder, report, ingest_seconds)
    finally:
        pg.stop()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


async def _measure(
    args: argparse.Namespace,
    command: str,
    dsn: str,
    dataset: Dataset,
    corpus_ids: set[str],
    embedder: LocalEmbedder,
    report: IngestReport,
    ingest_seconds: float,
) -> Results:
    k = args.top_k
    judged = dataset.judged
    conn = await asyncpg.connect(dsn)
    try:
        doc_rows = await conn.fetch("SELECT id, external_id FROM documents")
        chunks = int(await conn.fetchval("SELECT count(*) FROM chunks"))
    finally:
        await conn.close()
    stored = {r["external_id"] for r in doc_rows}
    if stored != corpus_ids or len(doc_rows) != len(corpus_ids):
        raise SystemExit(
            f"the database holds {len(doc_rows)} documents, the corpus {len(corpus_ids)} "
            f"({len(stored - corpus_ids)} not in the corpus): use an empty --keep directory for this data set"
        )
    evaluator = Evaluator({r["id"]: r["external_id"] for r in doc_rows}, k)

    # Queries, embedded one at a time as the answer path does.
    embedder.encode(["warm-up"])
    vectors: dict[str, Vector] = {}
    embed_seconds = []
    for q in dataset.queries:
        started = time.perf_counter()
        vectors[q.id] = (await embedder.embed([q.text]))[0]
        embed_seconds.append(time.perf_counter() - started)

    runs: dict[str, Run] = {}
    diagnostics: dict[str, Run] = {}
    pool = await create_pool(dsn, min_size=1, max_size=1, ef_search=args.ef_search)
    try:
        retriever = Retriever(pool)
        labels: dict[Mode, str] = {
            "dense": f"dense (service query, hnsw.ef_search {args.ef_search})",
            "sparse": "full-text (OR of terms, ts_rank_cd)",
            "hybrid": f"hybrid (RRF k={RRF_K})",
        }
        for mode, label in labels.items():
            run = runs.setdefault(mode, Run(label, note="service: Retriever.search"))
            for q in judged[:3]:  # warm-up: plans, caches
                await evaluator.service_ranking(retriever, vectors[q.id], q.text, mode)
            for q in judged:
                started = time.perf_counter()
                run.ranked[q.id] = await evaluator.service_ranking(retriever, vectors[q.id], q.text, mode)
                run.seconds.append(time.perf_counter() - started)
            say(f"{label}: nDCG@{k} {run.mean('nDCG@k', judged, k):.3f}")
        in_effect = {name: await effective_setting(pool, name) for name in ("hnsw.ef_search", "hnsw.iterative_scan")}

        # Exact search and the full-text variants, on one connection with the same settings.
        async with pool.acquire() as conn:
            exact = runs.setdefault("exact", Run("dense (exact cosine, no index)", note="seq scan"))
            dense40: dict[str, list[int]] = {}
            exact40: dict[str, list[int]] = {}
            for q in judged:
                started = time.perf_counter()
                exact40[q.id] = await evaluator.exact_chunks(conn, vectors[q.id], SERVICE_CANDIDATES)
                exact.seconds.append(time.perf_counter() - started)
                exact.ranked[q.id] = evaluator.documents(exact40[q.id])
                dense40[q.id] = await evaluator.chunk_ranking(conn, _DENSE_SQL, vectors[q.id], SERVICE_CANDIDATES)

            variants = {
                "or/ts_rank_cd": ("or", "ts_rank_cd"),
                "and/ts_rank_cd": ("and", "ts_rank_cd"),
                "or/ts_rank": ("or", "ts_rank"),
            }
            sparse40: dict[str, dict[str, list[int]]] = {}
            for name, (op, rank) in variants.items():
                sql = _SPARSE_SQL.format(tsquery=_TSQUERY[op], rank=rank)
                run = diagnostics[f"sparse {name}"] = Run(f"full-text: {op.upper()} of terms, {rank}")
                sparse40[name] = {}
                for q in judged:
                    started = time.perf_counter()
                    sparse40[name][q.id] = await evaluator.chunk_ranking(conn, sql, q.text, SERVICE_CANDIDATES)
                    run.seconds.append(time.perf_counter() - started)
                    run.ranked[q.id] = evaluator.documents(sparse40[name][q.id])
            # AND first, then the OR matches not already there: strict matches rank above partial ones.
            fallback = diagnostics["sparse and→or"] = Run("full-text: AND, then OR for the rest, ts_rank_cd")
            for q in judged:
                chunk_ids = dedupe([*sparse40["and/ts_rank_cd"][q.id], *sparse40["or/ts_rank_cd"][q.id]])
                fallback.ranked[q.id] = evaluator.documents(chunk_ids)

            def fused(dense: Mapping[str, list[int]], sparse: Mapping[str, list[int]], qid: str) -> list[str]:
                return evaluator.documents(c for c, _ in rrf([dense[qid], sparse[qid]]))

            for name, label in (
                ("or/ts_rank_cd", "hybrid: dense + OR/ts_rank_cd (re-built service)"),
                ("and/ts_rank_cd", "hybrid: dense + AND/ts_rank_cd"),
                ("or/ts_rank", "hybrid: dense + OR/ts_rank"),
            ):
                run = diagnostics[f"hybrid {name}"] = Run(label)
                for q in judged:
                    run.ranked[q.id] = fused(dense40, sparse40[name], q.id)
            run = diagnostics["hybrid and→or"] = Run("hybrid: dense + AND, then OR")
            for q in judged:
                sparse = dedupe([*sparse40["and/ts_rank_cd"][q.id], *sparse40["or/ts_rank_cd"][q.id]])
                run.ranked[q.id] = fused(dense40, {q.id: sparse[:SERVICE_CANDIDATES]}, q.id)
            run = diagnostics["hybrid exact"] = Run("hybrid: exact dense + OR/ts_rank_cd")
            for q in judged:
                run.ranked[q.id] = fused(exact40, sparse40["or/ts_rank_cd"], q.id)
            rebuilt = diagnostics["hybrid or/ts_rank_cd"]
            agreement = sum(rebuilt.ranked[q.id] == runs["hybrid"].ranked[q.id] for q in judged)
            exact_plan = await plan_of(conn, _DENSE_SQL, vectors[judged[0].id], k, settings=("enable_indexscan = off",))
    finally:
        await pool.close()

    hnsw, exact_ms = await _hnsw_sweep(evaluator, dsn, dataset, vectors, sorted({*EF_SWEEP, args.ef_search}), k)
    return Results(
        command=command,
        dataset=dataset,
        k=k,
        ef_search=args.ef_search,
        documents=len(doc_rows),
        chunks=chunks,
        ingest=report,
        ingest_seconds=ingest_seconds,
        embed_ms=1000 * statistics.median(embed_seconds),
        runs=runs,
        diagnostics=diagnostics,
        hnsw=hnsw,
        exact_plan=exact_plan,
        exact_ms_p50=exact_ms,
        in_effect=in_effect,
        refetches=evaluator.refetches,
        hybrid_agreement=agreement,
        machine=machine_info(embedder),
    )


async def effective_setting(pool: asyncpg.Pool, name: str) -> str:
    """A setting as a pooled connection has it *after* a release (asyncpg runs RESET ALL then)."""
    async with pool.acquire() as conn:
        await conn.fetchval("SELECT '[1]'::vector <=> '[1]'::vector")  # loads pgvector: its settings exist
        value = await conn.fetchval(f"SHOW {name}")
    return str(value) if value else "unset"


async def _hnsw_sweep(
    evaluator: Evaluator, dsn: str, dataset: Dataset, vectors: Mapping[str, Vector], efs: Sequence[int], k: int
) -> tuple[list[HnswPoint], float]:
    """HNSW top k against the exact top k, over every query (judged or not), per ef_search.

    The HNSW side sets `hnsw.ef_search` itself, per transaction, and `enable_seqscan = off`: on a
    table this small pgvector's cost model makes Postgres prefer an exact sequential scan once
    ef_search is high enough (checked with EXPLAIN; what the planner picks on its own is reported
    next to it). The service side is `Retriever.search` on a pool made by `create_pool(ef_search=…)`,
    as deployed.
    """
    truth: dict[str, set[int]] = {}
    exact_seconds: list[float] = []
    points = []
    conn = await asyncpg.connect(dsn)
    try:
        await register_vector(conn)
        for q in dataset.queries:
            started = time.perf_counter()
            truth[q.id] = set(await evaluator.exact_chunks(conn, vectors[q.id], k))
            exact_seconds.append(time.perf_counter() - started)
        for ef in efs:
            hnsw = (f"hnsw.ef_search = {int(ef)}",)
            first = vectors[dataset.queries[0].id]
            planner = await plan_of(conn, _DENSE_SQL, first, k, settings=hnsw)
            forced = await plan_of(conn, _DENSE_SQL, first, k, settings=(*hnsw, "enable_seqscan = off"))
            if "chunks_embedding_hnsw" not in forced:
                raise SystemExit(f"ef_search {ef}: cannot make Postgres use the HNSW index: {forced}")
            overlaps, seconds, perfect = [], [], 0
            for warm_up in (True, False):
                for q in dataset.queries[:3] if warm_up else dataset.queries:
                    async with conn.transaction():
                        await conn.execute(f"SET LOCAL hnsw.ef_search = {int(ef)}; SET LOCAL enable_seqscan = off")
                        started = time.perf_counter()
                        found = await evaluator.chunk_ranking(conn, _DENSE_SQL, vectors[q.id], k)
                        elapsed = time.perf_counter() - started
                    if not warm_up:
                        seconds.append(elapsed)
                        overlaps.append(len(truth[q.id].intersection(found)) / k)
                        perfect += set(found) == truth[q.id]

            pool = await create_pool(dsn, min_size=1, max_size=1, ef_search=ef)
            try:
                retriever = Retriever(pool)
                service, service_seconds = [], []
                for q in dataset.queries:
                    started = time.perf_counter()
                    sources = await retriever.search(vectors[q.id], q.text, top_k=k, mode="dense")
                    service_seconds.append(time.perf_counter() - started)
                    service.append(len(truth[q.id].intersection(s.chunk_id for s in sources)) / k)
                service_ef = await effective_setting(pool, "hnsw.ef_search")
            finally:
                await pool.close()
            points.append(
                HnswPoint(
                    ef_search=ef,
                    overlap=statistics.fmean(overlaps),
                    perfect=perfect,
                    ms_p50=_ms(seconds, 50),
                    ms_p95=_ms(seconds, 95),
                    planner="HNSW index" if "chunks_embedding_hnsw" in planner else "exact (seq scan)",
                    service_overlap=statistics.fmean(service),
                    service_ms_p50=_ms(service_seconds, 50),
                    service_ef=service_ef,
                )
            )
            say(
                f"ef_search {ef}: HNSW recall@{k} {points[-1].overlap:.3f}, planner: {points[-1].planner}, "
                f"service connection has ef_search {service_ef}"
            )
    finally:
        await conn.close()
    return points, _ms(exact_seconds, 50)


def machine_info(embedder: LocalEmbedder) -> dict[str, str]:
    import platform

    import torch

    return {
        "cpu": cpu_model(),
        "cores": str(nproc()),
        "load average at the end": load_text(),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "model": embedder.model,
    }


# --------------------------------------------------------------------------- reporting

COLUMNS = ("nDCG@k", "nDCG@k (leaderboard)", "recall@k (≥1)", "recall@k (≥2)", "MRR@k (≥1)", "P@k (≥1)")


def _header(k: int) -> list[str]:
    return [c.replace("@k", f"@{k}") for c in COLUMNS]


def _row(run: Run, queries: Sequence[Query], k: int, *, short: bool = False) -> list[str]:
    cells = [f"{run.mean(metric, queries, k):.3f}" for metric in COLUMNS]
    extra = [str(run.short(k))] if short else []
    return [run.name, *cells, *extra, f"{run.ms:.1f}" if run.seconds else "–"]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def leaderboard_quirk(results: Results) -> float | None:
    """The leaderboard's evaluation skips the first qrels line as a header; this file has none."""
    first = results.dataset.first_qrels_line
    if first is None:
        return None
    queries = []
    for q in results.dataset.judged:
        judgments = {d: g for d, g in q.judgments.items() if (q.id, d) != first}
        if judgments:
            queries.append(Query(q.id, q.text, judgments))
    return results.runs["exact"].mean("nDCG@k (leaderboard)", queries, results.k)


def oracle_recall(queries: Sequence[Query], k: int, min_grade: int) -> float:
    """The best recall@k any ranking can reach: k / |relevant| when a query has more than k."""
    values = []
    for q in queries:
        relevant = sum(1 for g in q.judgments.values() if g >= min_grade)
        values.append(min(k, relevant) / relevant)
    return statistics.fmean(values)


def render(results: Results) -> str:
    k, judged, ds = results.k, results.dataset.judged, results.dataset
    header = ["method", *_header(k), "ms/query (p50)"]
    main_rows = [_row(results.runs[m], judged, k) for m in ("dense", "exact", "sparse", "hybrid")]
    grade_counts: dict[int, int] = {}
    for q in judged:
        for g in q.judgments.values():
            grade_counts[g] = grade_counts.get(g, 0) + 1
    grades = ", ".join(f"{g}: {n:,}" for g, n in sorted(grade_counts.items()))
    unjudged = len(ds.queries) - len(judged)
    lines = [
        f"Command: `{results.command}`  ",
        f"Date: {dt.date.today().isoformat()}  ",
        "Machine: " + ", ".join(f"{key} {value}" for key, value in results.machine.items()) + "  ",
        f"Data: {results.documents:,} passages ({results.chunks:,} chunks), {len(ds.queries)} queries of which "
        f"{len(judged)} have judgments ({unjudged} have none and are left out of every quality metric, "
        f"as the leaderboard's code also does), {ds.judgments:,} judgments (grades {grades}).  ",
        f"Ingest: {results.ingest.added:,} added, {results.ingest.unchanged:,} unchanged, "
        f"{results.ingest_seconds:.0f} s. Query embedding: {results.embed_ms:.1f} ms p50 (one `embed([q])` each).",
        "",
        *_table(header, main_rows),
        "",
        f"- nDCG@{k}: DCG = Σ_(i=1..{k}) grade_i / log2(i+1), unjudged = 0; ideal = the query's best {k} grades "
        "among *all* its judgments (BEIR / pytrec_eval `ndcg_cut`).",
        f"- nDCG@{k} (leaderboard): the same DCG divided by the DCG of the retrieved top {k}'s own grades "
        "sorted descending (0 if none is judged); it ignores relevant passages that were not retrieved.",
        f"- recall@{k} (≥t): judged passages with grade ≥ t found in the top {k} / all with grade ≥ t. "
        f"The best any ranking can reach here is {oracle_recall(judged, k, 1):.3f} (≥1) and "
        f"{oracle_recall(judged, k, 2):.3f} (≥2), because most queries have far more than {k} relevant passages.",
        f"- MRR@{k} (≥1): 1/rank of the first passage with grade ≥ 1; P@{k} (≥1): share of the top {k} with grade ≥ 1.",
        "- Latency: `Retriever.search` round trip (its one SQL statement always runs both the vector and the "
        "full-text part; the mode only picks the ranking), without the query embedding; the exact row is a "
        "plain sequential-scan query.",
    ]
    configured = {"hnsw.ef_search": str(results.ef_search), "hnsw.iterative_scan": "relaxed_order"}
    if results.in_effect != configured:
        lines.append(
            "- **The service's connections lose their pgvector settings after first use**: configured "
            + ", ".join(f"{n} = {v}" for n, v in configured.items())
            + " (`create_pool(ef_search=…)`), in effect on a pooled connection after a release: "
            + ", ".join(f"{n} = {v}" for n, v in results.in_effect.items())
            + " (asyncpg runs `RESET ALL` when a connection goes back to the pool; unset means pgvector's "
            "defaults, ef_search 40 and iterative scans off)."
        )
    if results.refetches:
        lines.append(f"- {results.refetches} searches returned repeated documents and were asked for more.")
    quirk = leaderboard_quirk(results)
    if quirk is not None:
        lines.append(
            f"- The leaderboard's code skips the first qrels line as a header; this file has none. Scored that "
            f"way, exact dense gives {quirk:.4f} (leaderboard formula) instead of "
            f"{results.runs['exact'].mean('nDCG@k (leaderboard)', judged, k):.4f}."
        )
    lines += [
        "",
        f"Leaderboard, nDCG@{k} with the leaderboard formula, exact cosine over this subset: "
        + ", ".join(f"{name} {value:.3f}" for name, value in LEADERBOARD.items())
        + ".",
        "",
        "Full-text and fusion variants (diagnostics: the bench's own SQL; the first hybrid row re-builds the "
        f"service's fusion and matched it on {results.hybrid_agreement}/{len(judged)} queries):",
        "",
        *_table(
            [*header[:-1], f"queries with < {k} results", header[-1]],
            [_row(run, judged, k, short=True) for run in results.diagnostics.values()],
        ),
        "",
        "Paired differences in standard nDCG@10 (mean over queries, 95% bootstrap interval):",
        "",
    ]
    comparisons = [
        ("hybrid − dense", results.runs["dense"], results.runs["hybrid"]),
        ("hybrid − full-text", results.runs["sparse"], results.runs["hybrid"]),
        ("dense (HNSW) − dense (exact)", results.runs["exact"], results.runs["dense"]),
        ("full-text AND→OR − OR", results.runs["sparse"], results.diagnostics["sparse and→or"]),
        ("hybrid AND→OR − hybrid OR", results.runs["hybrid"], results.diagnostics["hybrid and→or"]),
    ]
    for label, a, b in comparisons:
        mean, low, high = paired_bootstrap(a.per_query("nDCG@k", judged, k), b.per_query("nDCG@k", judged, k))
        lines.append(f"- {label}: {mean:+.3f} [{low:+.3f}, {high:+.3f}]")
    lines += [
        "",
        f"HNSW recall@{k} against exact search ({len(ds.queries)} queries incl. unjudged, overlap of chunk ids; "
        f"index m=16, ef_construction=64; exact search {results.exact_ms_p50:.1f} ms/query p50, "
        f"`{results.exact_plan}`):",
        "",
        *_table(
            [
                "hnsw.ef_search",
                f"HNSW recall@{k}",
                f"identical top {k}",
                "HNSW ms/query p50",
                "p95",
                "planner's own choice",
                "service: ef_search in effect",
                f"service dense mode recall@{k}",
                "service ms/query p50",
            ],
            [
                [
                    str(p.ef_search) + (" (default)" if p.ef_search == results.ef_search else ""),
                    f"{p.overlap:.3f}",
                    f"{p.perfect}/{len(ds.queries)}",
                    f"{p.ms_p50:.2f}",
                    f"{p.ms_p95:.2f}",
                    p.planner,
                    p.service_ef,
                    f"{p.service_overlap:.3f}",
                    f"{p.service_ms_p50:.1f}",
                ]
                for p in results.hnsw
            ],
        ),
        "",
        "HNSW columns: `SELECT … ORDER BY embedding <=> $1 LIMIT k` with `enable_seqscan = off` (EXPLAIN-checked "
        "to use `chunks_embedding_hnsw`). Planner's own choice: the plan Postgres picks for that query without the "
        'override. Service columns: `Retriever.search(mode="dense")` as deployed (whatever plan Postgres picks; '
        "the time includes the full-text half of its SQL).",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.retrieval", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv")
    parser.add_argument("--top-k", type=int, default=10, help="cut-off k for every metric (default 10)")
    parser.add_argument("--ef-search", type=int, default=100, help="hnsw.ef_search for the main runs (default 100)")
    parser.add_argument(
        "--keep", type=Path, default=None, help="database directory to keep and reuse across runs (skips re-embedding)"
    )
    args = parser.parse_args(argv)
    if args.top_k < 1 or not 1 <= args.ef_search <= 1000:
        parser.error("--top-k must be positive and --ef-search within 1..1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    missing = [
        name for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv") if not (args.data_dir / name).is_file()
    ]
    if missing:
        print(
            f"benchmark data not found in {args.data_dir}: missing {', '.join(missing)}\n"
            "bench.retrieval needs a BEIR folder (e.g. ../shared/data/msmarco-5k next to the repository).",
            file=sys.stderr,
        )
        return 2
    command = shlex.join([".venv/bin/python", "-m", "bench.retrieval", *argv])
    results = asyncio.run(evaluate(args, command))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
