"""Retrieval quality per mode and fusion on BEIR sets (through `rag-eval`'s measure), plus HNSW recall.

Default: ../shared/data/msmarco-5k and ../shared/data/business-reports, each ingested into a scratch
embedded Postgres (`--keep DIR` reuses DIR/<set name>). nDCG@10 per method with the paired bootstrap
difference against dense; HNSW recall@10 against an exact scan, per `hnsw.ef_search`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import asyncpg
from pgvector.asyncpg import register_vector

from bench import _kit as kit
from ingest.beir import load
from ingest.evaluate import Method, measure, table
from ingest.scratch import scratch_corpus
from service.embeddings.encoders import create_embedder
from service.postgres.retrieval import RetrievalConfig as C
from service.settings import Settings

SETS = (kit.SHARED_DATA / "msmarco-5k", kit.SHARED_DATA / "business-reports")
METHODS = [
    Method("dense (default)", C()),
    Method("full-text, ts_rank", C(mode="sparse", rank="ts_rank")),
    Method("full-text, ts_rank_cd", C(mode="sparse", rank="ts_rank_cd")),
    Method("RRF, ts_rank_cd (the old default)", C(mode="hybrid", fusion="rrf", dense_weight=0.5, rank="ts_rank_cd")),
    Method("RRF, ts_rank", C(mode="hybrid", fusion="rrf", dense_weight=0.5)),
    Method("RRF 0.7 dense, ts_rank", C(mode="hybrid", fusion="rrf", dense_weight=0.7)),
    *(Method(f"convex {w} dense, ts_rank", C(mode="hybrid", dense_weight=w)) for w in (0.5, 0.6, 0.7, 0.8)),
]
EF_SEARCH = (10, 20, 40, 100)
_TOP = "SELECT id FROM chunks ORDER BY embedding <=> $1 LIMIT $2"


async def hnsw_recall(settings: Settings, questions: Sequence[str], k: int = 10) -> str:
    """Share of the exact top k that the HNSW index returns, mean over the queries, per ef_search."""
    vectors = await create_embedder(settings).embed(list(questions))
    conn = await asyncpg.connect(str(settings.database_url))
    await register_vector(conn)

    async def top(vector: object, *setting: str) -> set[int]:
        async with conn.transaction():
            for s in setting:
                await conn.execute(f"SET LOCAL {s}")
            return {r["id"] for r in await conn.fetch(_TOP, vector, k)}

    try:
        exact = [await top(v, "enable_indexscan = off") for v in vectors]
        cells = []
        for ef in EF_SEARCH:
            found = [await top(v, "enable_seqscan = off", f"hnsw.ef_search = {ef}") for v in vectors]
            recall = sum(len(e & f) / k for e, f in zip(exact, found, strict=True)) / len(vectors)
            cells.append(f"{recall:.3f}{' (default)' if ef == settings.hnsw_ef_search else ''}")
    finally:
        await conn.close()
    return kit.table(["hnsw.ef_search", *map(str, EF_SEARCH)], [[f"HNSW recall@{k} vs exact", *cells]])


async def evaluate(data_dir: Path, keep: Path | None, limit: int | None) -> str:
    dataset = load(data_dir)
    work = keep / data_dir.name if keep else None
    base = kit.make_settings("postgresql://scratch", "redis://127.0.0.1:1", Path("."))
    async with scratch_corpus(base, data_dir / "corpus.jsonl", keep=work, limit=limit) as (settings, _):
        report = await measure(settings, dataset, METHODS)
        recall = await hnsw_recall(settings, [q.text for q in dataset.queries])
    facts = (
        f"**{data_dir.name}**: {report.documents:,} documents, {len(dataset.queries)} judged queries "
        f"({dataset.unjudged} without a judgment), {dataset.judgments:,} judgments"
        f"{', qrels with a header' if dataset.qrels_header else ''}."
    )
    return "\n\n".join([facts, table(report), recall])


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.arguments("retrieval", __doc__)
    parser.add_argument("data_dirs", type=Path, nargs="*", default=list(SETS), help="BEIR folders")
    parser.add_argument("--keep", type=Path, default=None, help="folder for the databases, kept and reused")
    parser.add_argument("--limit-corpus", type=int, default=None, help="only the first N documents (smoke runs)")
    args = kit.parse(parser, argv, limit_corpus=60)
    sections = [asyncio.run(evaluate(d, args.keep, args.limit_corpus)) for d in args.data_dirs]
    kit.publish("Retrieval quality", kit.section(args, *sections), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
