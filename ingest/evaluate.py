"""`rag-eval`: measure retrieval on your own data, a BEIR-layout folder, per retrieval mode.

    rag-eval DATA_DIR [--scratch [--keep DIR]] [--top-k 10] [--mode dense --mode full-text --mode fused]
             [--fusion convex|rrf] [--dense-weight W] [--rank ts_rank|ts_rank_cd] [--json]

DATA_DIR holds `corpus.jsonl`, `queries.jsonl` and `qrels/*.tsv` (with or without a header). Without
`--scratch` the live corpus (DATABASE_URL) is searched: ingest the folder first with
`rag-ingest add DATA_DIR/corpus.jsonl --format beir`, so documents keep their BEIR ids. With
`--scratch` the corpus goes into a throwaway embedded Postgres. Each judged query is embedded as the
answer path does and retrieved through the service's `Retriever`; chunks count as their document.
Prints nDCG@k, recall@k and MRR@k per mode, the paired difference in nDCG@k against dense with a 95 %
bootstrap interval, and the retrieval latency. Exit codes: 0 done, 2 bad input or no usable corpus.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ingest import metrics
from ingest.beir import BeirError, Dataset, load
from ingest.scratch import scratch_corpus
from service.postgres.corpus import open_corpus
from service.postgres.db import DATABASE_ERRORS, CorpusMismatchError, database_failure
from service.postgres.retrieval import Mode, RetrievalConfig, Retriever
from service.settings import Settings

MODES: dict[str, Mode] = {"dense": "dense", "full-text": "sparse", "fused": "hybrid"}


@dataclass(frozen=True)
class Method:
    """One way of retrieving: the service's Retriever with a configuration (its mode among it), named."""

    name: str
    config: RetrievalConfig


@dataclass
class Scores:
    """Per judged query, in the dataset's order."""

    ndcg: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    rr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def summary(self, k: int, baseline: Scores | None) -> dict[str, Any]:
        ordered = sorted(self.seconds)
        out: dict[str, Any] = {
            f"ndcg@{k}": metrics.mean(self.ndcg),
            f"recall@{k}": metrics.mean(self.recall),
            f"mrr@{k}": metrics.mean(self.rr),
            "ms_p50": 1000 * ordered[len(ordered) // 2] if ordered else None,
        }
        if baseline is not None and baseline is not self:
            diff, low, high = metrics.paired_bootstrap(baseline.ndcg, self.ndcg)
            out["ndcg_vs_dense"] = {"mean": diff, "low": low, "high": high}
        return out


@dataclass
class Report:
    dataset: Dataset
    k: int
    documents: int
    missing: int  # judged documents the corpus does not hold
    scores: dict[str, Scores]
    baseline: str | None  # the first dense method: the others are compared with it

    def summary(self) -> dict[str, Any]:
        baseline = self.scores[self.baseline] if self.baseline else None
        return {
            "data": str(self.dataset.path),
            "queries": len(self.dataset.queries),
            "unjudged_queries": self.dataset.unjudged,
            "judgments": self.dataset.judgments,
            "qrels_header": self.dataset.qrels_header,
            "documents": self.documents,
            "judged_documents_missing": self.missing,
            "k": self.k,
            "modes": {name: s.summary(self.k, baseline) for name, s in self.scores.items()},
        }


def table(report: Report) -> str:
    """The summary as a Markdown table, one row per mode."""
    k = report.k
    lines = [
        f"| mode | nDCG@{k} | recall@{k} | MRR@{k} | Δ nDCG@{k} vs dense [95 % CI] | ms p50 |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, row in report.summary()["modes"].items():
        vs = row.get("ndcg_vs_dense")
        delta = f"{vs['mean']:+.3f} [{vs['low']:+.3f}, {vs['high']:+.3f}]" if vs else "–"
        ms = f"{row['ms_p50']:.1f}" if row["ms_p50"] is not None else "–"
        lines.append(
            f"| {name} | {row[f'ndcg@{k}']:.3f} | {row[f'recall@{k}']:.3f} | {row[f'mrr@{k}']:.3f} | {delta} | {ms} |"
        )
    return "\n".join(lines)


async def measure(settings: Settings, dataset: Dataset, methods: Sequence[Method], k: int = 10) -> Report:
    """Every method over every judged query of `dataset`, against the corpus `settings` points at."""
    async with open_corpus(settings, with_embedder=True) as corpus:  # its pool searches with RAG_HNSW_EF_SEARCH
        assert corpus.embedder is not None
        rows = await corpus.pool.fetch("SELECT id, external_id FROM documents")
        names = {r["id"]: r["external_id"] for r in rows}
        judged = {d for q in dataset.queries for d, g in q.judgments.items() if g > 0}
        missing = len(judged - set(names.values()))
        if missing == len(judged):
            raise BeirError(
                f"{dataset.path / 'corpus.jsonl'}: none of the judged documents is in this corpus; ingest it "
                "with `rag-ingest add DATA_DIR/corpus.jsonl --format beir`, or pass --scratch"
            )
        retrievers = {m.name: Retriever(corpus.pool, config=m.config) for m in methods}
        scores = {m.name: Scores() for m in methods}
        await corpus.embedder.embed(["warm-up"])
        for query in dataset.queries:
            vector = (await corpus.embedder.embed([query.text]))[0]
            for method in methods:
                started = time.perf_counter()
                ranked = await _documents(retrievers[method.name], vector, query.text, names, k)
                got = scores[method.name]
                got.seconds.append(time.perf_counter() - started)
                got.ndcg.append(metrics.ndcg(ranked, query.judgments, k))
                got.recall.append(metrics.recall(ranked, query.judgments, k))
                got.rr.append(metrics.reciprocal_rank(ranked, query.judgments, k))
    baseline = next((m.name for m in methods if m.config.mode == "dense"), None)
    return Report(dataset, k, len(names), missing, scores, baseline)


async def _documents(retriever: Retriever, vector: Any, question: str, names: dict[int, str], k: int) -> list[str]:
    """The top k distinct documents; asks for more chunks while a document's chunks crowd the top."""
    top = k
    while True:
        sources = await retriever.search(vector, question, top_k=top)
        ranked = list(dict.fromkeys(names[s.document_id] for s in sources))
        if len(ranked) >= k or len(sources) < top:
            return ranked[:k]
        top *= 2


def methods_for(args: argparse.Namespace, settings: Settings) -> list[Method]:
    config = RetrievalConfig(
        fusion=args.fusion or settings.hybrid_fusion,
        dense_weight=settings.hybrid_dense_weight if args.dense_weight is None else args.dense_weight,
        rank=args.rank or settings.fulltext_rank,
    )
    return [Method(name, replace(config, mode=MODES[name])) for name in dict.fromkeys(args.mode or MODES)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rag-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data_dir", type=Path, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/*.tsv")
    p.add_argument("--scratch", action="store_true", help="ingest the corpus into a throwaway database")
    p.add_argument("--keep", type=Path, help="with --scratch: the database folder to keep and reuse")
    p.add_argument("--limit-corpus", type=int, help="with --scratch: only the first N documents (smoke runs)")
    p.add_argument("--top-k", type=int, default=10, help="the cut-off k of every metric (default 10)")
    p.add_argument("--mode", action="append", choices=list(MODES), help="repeatable; default: all")
    p.add_argument("--fusion", choices=["convex", "rrf"], help="fused mode (default RAG_HYBRID_FUSION)")
    p.add_argument("--dense-weight", type=float, help="fused mode: dense's weight (default RAG_HYBRID_DENSE_WEIGHT)")
    p.add_argument("--rank", choices=["ts_rank", "ts_rank_cd"], help="full-text ranking (default RAG_FULLTEXT_RANK)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary")
    return p


async def run(args: argparse.Namespace, settings: Settings) -> Report:
    dataset = load(args.data_dir)
    methods = methods_for(args, settings)
    if not args.scratch:
        return await measure(settings, dataset, methods, args.top_k)
    async with scratch_corpus(settings, args.data_dir / "corpus.jsonl", keep=args.keep, limit=args.limit_corpus) as (
        scratch,
        ingested,
    ):
        print(
            f"scratch corpus: {ingested.added} added, {ingested.updated} updated, {ingested.unchanged} unchanged, "
            f"{ingested.chunks} chunks written",
            file=sys.stderr,
        )
        return await measure(scratch, dataset, methods, args.top_k)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.top_k < 1 or (args.dense_weight is not None and not 0 <= args.dense_weight <= 1):
        print("rag-eval: --top-k must be positive and --dense-weight within [0, 1]", file=sys.stderr)
        return 2
    if not args.scratch and (args.keep or args.limit_corpus is not None):
        print("rag-eval: --keep and --limit-corpus go with --scratch", file=sys.stderr)
        return 2
    try:
        settings = Settings()
        report = asyncio.run(run(args, settings))
    except (BeirError, CorpusMismatchError) as exc:
        print(f"rag-eval: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"rag-eval: invalid settings: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    except DATABASE_ERRORS as exc:
        print(f"rag-eval: {database_failure(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(report.summary(), indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
