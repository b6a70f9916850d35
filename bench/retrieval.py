"""Retrieval quality on a BEIR data set: dense, full-text and hybrid, plus HNSW recall.

    python -m bench.retrieval DATA_DIR [--top-k 10] [--ef-search 100] [--keep DIR] [--quick] [--no-write]

DATA_DIR holds `corpus.jsonl`, `queries.jsonl` and `qrels/test.tsv` (with or without a header). The
corpus is ingested as `rag-ingest add --format beir` would into an embedded Postgres (a temp dir, or
`--keep DIR` to reuse it); each query is embedded as the answer path does and retrieved through
`Retriever.search` in its three modes, chunks mapped to their document's BEIR id. Metrics at k over
the judged queries (a grade-t metric over the queries with a judgment ≥ t): nDCG (standard, as
pytrec_eval; and the leaderboard variant, whose ideal is the retrieved list's own grades), recall,
MRR, P. Full-text and fusion variants run as the bench's own SQL, as diagnostics; HNSW recall is the
index's top k against an exact sequential scan, per `hnsw.ef_search`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import numpy as np
import numpy.typing as npt
from pgvector.asyncpg import register_vector

from bench._kit import arguments, jsonl, make_settings, parse, publish, run_line, say, table
from bench.ingest import load_items
from ingest.loaders import LoadFailure, SourceDocument
from ingest.pipeline import IngestOptions, IngestReport, ingest_documents
from service.embedded import start_postgres
from service.embeddings.encoders import LocalEmbedder
from service.postgres.corpus import open_corpus
from service.postgres.db import create_pool
from service.postgres.retrieval import RRF_K, Mode, Retriever, rrf

Vector = npt.NDArray[np.float32]
Judgments = dict[str, int]  # corpus id -> grade
T = TypeVar("T")

# Public leaderboard figures for msmarco-5k only: nDCG@10, leaderboard formula, exact cosine over the subset.
LEADERBOARD = {
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
    qrels_header: bool = False

    @property
    def judged(self) -> list[Query]:
        return [q for q in self.queries if q.judgments]


def read_qrels(path: Path) -> tuple[dict[str, Judgments], tuple[str, str] | None, bool]:
    """BEIR qrels: `query-id <TAB> corpus-id <TAB> grade`; a header line, if any, is skipped.

    Returns the judgments, the first judged (query, corpus) pair, and whether the file has a header.
    """
    qrels: dict[str, Judgments] = {}
    first: tuple[str, str] | None = None
    header = False
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
                header = True
                continue
            raise SystemExit(f"{path}:{number}: grade {grade!r} is not an integer") from None
        qrels.setdefault(query_id, {})[corpus_id] = value
        if first is None:
            first = (query_id, corpus_id)
    return qrels, first, header


def load_dataset(data_dir: Path) -> Dataset:
    qrels, first, header = read_qrels(data_dir / "qrels" / "test.tsv")
    rows = jsonl(data_dir / "queries.jsonl")
    queries = [Query(str(r["_id"]), str(r["text"]), qrels.get(str(r["_id"]), {})) for r in rows]
    return Dataset(data_dir, queries, sum(len(j) for j in qrels.values()), first, header)


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
    """NaN when the query has no judgment at `min_grade` (it is left out of the mean, not scored 0)."""
    relevant = {d for d, g in judgments.items() if g >= min_grade}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else math.nan


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


@dataclass
class Run:
    """One retrieval method over the judged queries: ranked corpus ids and latency per query."""

    name: str
    ranked: dict[str, list[str]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)

    def per_query(self, metric: str, queries: Sequence[Query], k: int) -> list[float]:
        fn = METRICS[metric]
        return [fn(self.ranked[q.id], q.judgments, k) for q in queries]

    def mean(self, metric: str, queries: Sequence[Query], k: int) -> float:
        """Mean over the queries where the metric is defined; NaN when it is defined for none."""
        values = [v for v in self.per_query(metric, queries, k) if not math.isnan(v)]
        return statistics.fmean(values) if values else math.nan

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


def _ms(seconds: Sequence[float], q: float) -> float:
    return 1000 * float(np.percentile(np.asarray(seconds), q))


async def evaluate(args: argparse.Namespace) -> Results:
    dataset = load_dataset(args.data_dir)
    judged = dataset.judged
    say(f"{args.data_dir}: {len(dataset.queries)} queries, {len(judged)} with judgments, {dataset.judgments} judgments")
    items = load_items(args.data_dir / "corpus.jsonl", args.limit_corpus)
    failures = [i for i in items if isinstance(i, LoadFailure)]
    if failures:
        raise SystemExit(f"{len(failures)} load failures, first: {failures[0]}")
    corpus_ids = {i.external_id for i in items if isinstance(i, SourceDocument)}

    work = args.keep or Path(tempfile.mkdtemp(prefix="ragbench-retrieval-"))
    pg = start_postgres(work)
    try:
        settings = make_settings(pg.url, "redis://127.0.0.1:1", work)
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
        return await _measure(args, args.command, pg.url, dataset, corpus_ids, embedder, report, ingest_seconds)
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
            run = runs.setdefault(mode, Run(label))
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
            exact = runs.setdefault("exact", Run("dense (exact cosine, no index)"))
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
            both = {q.id: dedupe([*sparse40["and/ts_rank_cd"][q.id], *sparse40["or/ts_rank_cd"][q.id]]) for q in judged}
            label = "full-text: AND, then OR for the rest, ts_rank_cd"
            diagnostics["sparse and→or"] = Run(label, {q: evaluator.documents(ids) for q, ids in both.items()})
            sparse40["and→or"] = {q: ids[:SERVICE_CANDIDATES] for q, ids in both.items()}
            hybrids = {
                "or/ts_rank_cd": (dense40, "hybrid: dense + OR/ts_rank_cd (re-built service)"),
                "and/ts_rank_cd": (dense40, "hybrid: dense + AND/ts_rank_cd"),
                "or/ts_rank": (dense40, "hybrid: dense + OR/ts_rank"),
                "and→or": (dense40, "hybrid: dense + AND, then OR"),
                "exact": (exact40, "hybrid: exact dense + OR/ts_rank_cd"),
            }
            for name, (dense, label) in hybrids.items():
                sparse = sparse40["or/ts_rank_cd" if name == "exact" else name]
                fused = {q.id: evaluator.documents(c for c, _ in rrf([dense[q.id], sparse[q.id]])) for q in judged}
                diagnostics[f"hybrid {name}"] = Run(label, fused)
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


# --------------------------------------------------------------------------- reporting

COLUMNS = ("nDCG@k", "nDCG@k (leaderboard)", "recall@k (≥1)", "recall@k (≥2)", "MRR@k (≥1)", "P@k (≥1)")


def _header(k: int) -> list[str]:
    return [c.replace("@k", f"@{k}") for c in COLUMNS]


def _row(run: Run, queries: Sequence[Query], k: int, *, short: bool = False) -> list[str]:
    cells = [_f(run.mean(metric, queries, k)) for metric in COLUMNS]
    extra = [str(run.short(k))] if short else []
    return [run.name, *cells, *extra, f"{run.ms:.1f}" if run.seconds else "–"]


def leaderboard_quirk(results: Results) -> float | None:
    """The leaderboard's evaluation skips the first qrels line as a header; this file has none."""
    first = results.dataset.first_qrels_line
    if first is None or results.dataset.qrels_header:
        return None
    queries = []
    for q in results.dataset.judged:
        judgments = {d: g for d, g in q.judgments.items() if (q.id, d) != first}
        if judgments:
            queries.append(Query(q.id, q.text, judgments))
    return results.runs["exact"].mean("nDCG@k (leaderboard)", queries, results.k)


def oracle_recall(queries: Sequence[Query], k: int, min_grade: int) -> float:
    """The best recall@k any ranking can reach (k / |relevant| when a query has more than k), over the
    queries with a judgment ≥ `min_grade`; NaN when none has one."""
    counts = [sum(1 for g in q.judgments.values() if g >= min_grade) for q in queries]
    values = [min(k, n) / n for n in counts if n]
    return statistics.fmean(values) if values else math.nan


def leaderboard_for(data_dir: Path) -> dict[str, float]:
    """The public leaderboard figures that apply to `data_dir`: msmarco-5k's, or none."""
    return LEADERBOARD if data_dir.resolve().name == "msmarco-5k" else {}


def _f(value: float, digits: int = 3) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def render(results: Results) -> str:
    k, judged, ds = results.k, results.dataset.judged, results.dataset
    header = ["method", *_header(k), "ms/query (p50)"]
    grades = Counter(g for q in judged for g in q.judgments.values())
    notes = [
        f"Data: `{ds.path.name}`, {results.documents:,} passages ({results.chunks:,} chunks), "
        f"{len(ds.queries)} queries "
        f"({len(judged)} judged), {ds.judgments:,} judgments (grades "
        f"{', '.join(f'{g}: {n:,}' for g, n in sorted(grades.items()))}"
        f"{'; qrels with a header' if ds.qrels_header else ''}). Ingest {results.ingest_seconds:.0f} s; query "
        f"embedding {results.embed_ms:.1f} ms p50. Best reachable recall@{k}: {_f(oracle_recall(judged, k, 1))} (≥1), "
        f"{_f(oracle_recall(judged, k, 2))} (≥2)."
    ]
    configured = {"hnsw.ef_search": str(results.ef_search), "hnsw.iterative_scan": "relaxed_order"}
    if results.in_effect != configured:
        notes.append(
            f"pgvector settings on a pooled connection after a release: {results.in_effect} (configured {configured})."
        )
    if (quirk := leaderboard_quirk(results)) is not None:
        notes.append(
            f"Skipping the first qrels line as the leaderboard's code does, exact dense scores {quirk:.4f} "
            "(leaderboard formula)."
        )
    if board := leaderboard_for(ds.path):
        notes.append(
            f"Leaderboard, nDCG@{k} (leaderboard formula): " + ", ".join(f"{n} {v:.3f}" for n, v in board.items()) + "."
        )
    comparisons = [
        ("hybrid − dense", results.runs["dense"], results.runs["hybrid"]),
        ("hybrid − full-text", results.runs["sparse"], results.runs["hybrid"]),
        ("dense (HNSW) − dense (exact)", results.runs["exact"], results.runs["dense"]),
        ("hybrid AND→OR − hybrid OR", results.runs["hybrid"], results.diagnostics["hybrid and→or"]),
    ]
    paired = []
    for label, a, b in comparisons:
        mean, low, high = paired_bootstrap(a.per_query("nDCG@k", judged, k), b.per_query("nDCG@k", judged, k))
        paired.append([label, f"{mean:+.3f}", f"[{low:+.3f}, {high:+.3f}]"])
    hnsw = [
        (
            f"{p.ef_search}{' (default)' if p.ef_search == results.ef_search else ''} | {p.overlap:.3f} | "
            f"{p.perfect}/{len(ds.queries)} | {p.ms_p50:.2f} | {p.ms_p95:.2f} | {p.planner} | "
            f"{p.service_ef} | {p.service_overlap:.3f} | {p.service_ms_p50:.1f}"
        )
        for p in results.hnsw
    ]
    return "\n\n".join(
        [
            run_line(results.command),
            " ".join(notes),
            table(header, [_row(results.runs[m], judged, k) for m in ("dense", "exact", "sparse", "hybrid")]),
            f"Diagnostics (the bench's own SQL; the first hybrid row re-builds the service's fusion and matched it on "
            f"{results.hybrid_agreement}/{len(judged)} queries):",
            table(
                [*header[:-1], f"queries with < {k} results", header[-1]],
                [_row(run, judged, k, short=True) for run in results.diagnostics.values()],
            ),
            table("paired difference, standard nDCG@k | mean | 95% bootstrap interval", paired),
            f"HNSW recall@{k} against exact search (all queries; exact {results.exact_ms_p50:.1f} ms p50, "
            f"`{results.exact_plan}`):",
            table(
                [
                    "hnsw.ef_search",
                    f"HNSW recall@{k}",
                    f"identical top {k}",
                    "ms p50",
                    "p95",
                    "planner's own choice",
                    "service: ef_search in effect",
                    f"service dense recall@{k}",
                    "service ms p50",
                ],
                hnsw,
            ),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = arguments("retrieval", __doc__)
    parser.add_argument("data_dir", type=Path, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv")
    parser.add_argument("--top-k", type=int, default=10, help="cut-off k for every metric")
    parser.add_argument("--ef-search", type=int, default=100, help="hnsw.ef_search for the main runs")
    parser.add_argument("--keep", type=Path, default=None, help="database directory to keep and reuse across runs")
    parser.add_argument("--limit-corpus", type=int, default=None, help="only the first N documents (smoke runs)")
    args = parse(parser, argv, limit_corpus=60)
    if args.top_k < 1 or not 1 <= args.ef_search <= 1000:
        parser.error("--top-k must be positive and --ef-search within 1..1000")
    missing = [n for n in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv") if not (args.data_dir / n).is_file()]
    if missing:
        print(f"benchmark data not found in {args.data_dir}: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    name = args.data_dir.resolve().name
    section = "Retrieval quality" + ("" if name == "msmarco-5k" else f" ({name})")
    publish(section, render(asyncio.run(evaluate(args))), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
