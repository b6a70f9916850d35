"""Filtered retrieval: a key that may read 1 %, 10 %, 30 % or 100 % of msmarco-5k, with and without iterative scans.

A copy of the msmarco database (bench/_kit.ensure_corpus) is split into collections p1/p9/p20/p70 by a
hash of the chunk id. Per scope and plan (the service's, HNSW forced with iterative scans on and off):
recall@10 of `Retriever.search` against an exact scan in the same collections, and its p50 latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import numpy as np
import numpy.typing as npt
from pgvector.asyncpg import register_vector

from bench import _kit as kit
from service.embeddings.encoders import LocalEmbedder
from service.postgres.db import SchemaParams, create_pool, migrate
from service.postgres.retrieval import Retriever
from service.settings import Settings

SECTION = "Filtered retrieval (collections)"
K = 10
DATABASE = "msmarco_collections"
# chunk id hash -> collection: 1 % p1, 9 % p9, 20 % p20, 70 % p70
_SPLIT_SQL = """
UPDATE chunks SET collection = CASE
    WHEN mod(abs(hashtext(id::text)), 100) = 0 THEN 'p1'
    WHEN mod(abs(hashtext(id::text)), 100) < 10 THEN 'p9'
    WHEN mod(abs(hashtext(id::text)), 100) < 30 THEN 'p20'
    ELSE 'p70' END;
-- a document's collection follows its (single, for msmarco passages) chunk's
UPDATE documents d SET collection = c.collection FROM chunks c WHERE c.document_id = d.id AND c.ordinal = 0;
"""
SCOPES: dict[str, tuple[str, ...] | None] = {
    "1 %": ("p1",),
    "10 %": ("p1", "p9"),
    "30 %": ("p1", "p20", "p9"),
    "100 %": ("p1", "p20", "p70", "p9"),
    "unfiltered (`*`)": None,
}
# How the searches run: the service as configured (the planner picks the plan), and the vector
# index forced (as the planner chooses on a larger corpus, where sorting a whole collection
# costs more than walking the index), with pgvector's iterative scan on and off.
MODES: dict[str, tuple[str, dict[str, str]]] = {
    "service": ("relaxed_order", {}),
    "hnsw": ("relaxed_order", {"enable_sort": "off"}),
    "hnsw, iterative off": ("off", {"enable_sort": "off"}),
}
_PLAN_SQL = """
EXPLAIN (FORMAT JSON) SELECT id FROM chunks
WHERE $2::text[] IS NULL OR collection = ANY($2::text[]) ORDER BY embedding <=> $1 LIMIT 40
"""
_COUNT_SQL = "SELECT count(*) FROM chunks WHERE $1::text[] IS NULL OR collection = ANY($1::text[])"
_EXACT_SQL = """
SELECT id FROM chunks WHERE $2::text[] IS NULL OR collection = ANY($2::text[])
ORDER BY embedding <=> $1 LIMIT $3
"""

Vector = npt.NDArray[np.float32]


@dataclass
class Case:
    recalls: list[float] = field(default_factory=list)
    short: int = 0  # queries whose dense ranking had fewer than K chunks
    plan: str = ""
    seconds: list[float] = field(default_factory=list)

    def row(self) -> list[str]:
        p50 = statistics.median(self.seconds) * 1000 if self.seconds else float("nan")
        return [f"{statistics.mean(self.recalls):.3f}", str(self.short), kit.fmt_ms(p50)]


async def _collections_database(admin_dsn: str, source_dsn: str) -> str:
    """A copy of the msmarco database split into p1/p9/p90 (made once; the source stays as other benches use it)."""
    dsn = kit.with_database(admin_dsn, DATABASE)
    if not await kit.fetchval(admin_dsn, "SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
        source = urlsplit(source_dsn).path.lstrip("/")
        kit.say(f"copying {source} to {DATABASE} …")
        await kit.fetchval(admin_dsn, f'CREATE DATABASE "{DATABASE}" TEMPLATE "{source}"')
    # the copy may predate migration 0006: the pool below migrates nothing, so the service's schema is ensured here
    await migrate(dsn, SchemaParams("sentence-transformers/all-MiniLM-L6-v2", 384))
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT count(*) FROM chunks WHERE collection = 'p20'") == 0:
            kit.say("splitting the chunks into collections p1 / p9 / p20 / p70 …")
            async with conn.transaction():
                await conn.execute(_SPLIT_SQL)
            await conn.execute("ANALYZE chunks")
    finally:
        await conn.close()
    return dsn


async def measure(
    dsn: str, queries: list[tuple[str, Vector]], repeat: int, ef_search: int
) -> tuple[dict[str, str], dict[str, dict[str, Case]]]:
    """How many chunks each scope holds, and per iterative-scan mode and scope, the measured case."""
    share = {}
    conn = await asyncpg.connect(dsn)
    try:
        total = await conn.fetchval("SELECT count(*) FROM chunks")
        # exact top-K inside each scope: a sequential scan (no index), on one connection
        await register_vector(conn)
        await conn.execute("SET enable_indexscan = off; SET enable_bitmapscan = off")
        exact: dict[str, list[list[int]]] = {}
        for label, names in SCOPES.items():
            arg = None if names is None else list(names)
            share[label] = f"{await conn.fetchval(_COUNT_SQL, arg):,} of {total:,} chunks"
            exact[label] = [[r["id"] for r in await conn.fetch(_EXACT_SQL, v, arg, K)] for _, v in queries]
    finally:
        await conn.close()
    kit.say("  ".join(f"{label}: {n}" for label, n in share.items()))

    results: dict[str, dict[str, Case]] = {}
    for mode, (iterative, extra) in MODES.items():
        pool = await create_pool(
            dsn, min_size=1, max_size=1, ef_search=ef_search, iterative_scan=iterative, settings=extra
        )
        try:
            retriever = Retriever(pool)
            for label, names in SCOPES.items():
                case = results.setdefault(mode, {}).setdefault(label, Case())
                async with pool.acquire() as conn:
                    plan = json.loads(await conn.fetchval(_PLAN_SQL, queries[0][1], names))
                    case.plan = _scan(plan[0]["Plan"])
                for text, vector in queries[:3]:  # warm-up: plans, caches
                    await retriever.search(vector, text, top_k=K, collections=names, mode="dense")
                for i, (text, vector) in enumerate(queries):
                    for _ in range(repeat):
                        started = time.perf_counter()
                        found = await retriever.search(vector, text, top_k=K, collections=names, mode="dense")
                        case.seconds.append(time.perf_counter() - started)
                    ids = [s.chunk_id for s in found]
                    case.short += len(ids) < K
                    truth = exact[label][i]
                    case.recalls.append(len(set(ids) & set(truth)) / max(1, len(truth)))
                kit.say(f"{mode} {label}: {case.plan}, recall@{K} {statistics.mean(case.recalls):.3f}")
        finally:
            await pool.close()
    return share, results


def report(share: dict[str, str], results: dict[str, dict[str, Case]], queries: int, args: argparse.Namespace) -> str:
    service, hnsw, off = (results[m] for m in MODES)
    rows = [
        [label, share[label], service[label].plan, *service[label].row(), *hnsw[label].row(), *off[label].row()]
        for label in SCOPES
    ]
    cells = " | ".join(
        f"{plan}recall@{K} | short | p50 ms" for plan in ("", "HNSW + iterative scan: ", "HNSW, iterative off: ")
    )
    header = f"the key may read | chunks | service: plan | {cells}"
    return kit.section(
        args,
        f"{queries} msmarco-5k queries × {args.repeat}; `hnsw.ef_search` {args.ef_search}, `hnsw.max_scan_tuples` "
        f"{Settings.model_fields['hnsw_max_scan_tuples'].default:,} (`RAG_HNSW_MAX_SCAN_TUPLES`). recall@{K}: the "
        "service's dense top 10 against an exact cosine scan inside the same collections; *short*: "
        f"queries that got fewer than {K} chunks; p50: one `Retriever.search` (dense and full-text halves). "
        "The three plans (*service*, *HNSW*, *iterative off*) are described under Notes.",
        kit.table(header, rows),
    )


def _scan(plan: dict[str, Any]) -> str:
    """The scan under the dense half's LIMIT: which index, or a sequential scan."""
    while plan.get("Plans") and plan["Node Type"] not in ("Index Scan", "Seq Scan", "Bitmap Heap Scan"):
        plan = plan["Plans"][0]
    if plan["Node Type"] == "Index Scan":
        return "HNSW" if "hnsw" in plan.get("Index Name", "") else f"{plan['Index Name']} + sort"
    return f"{plan['Node Type'].lower()} + sort"


async def run(args: argparse.Namespace) -> str:
    with kit.embedded_servers(kit.DATA_DIR) as servers:
        source_dsn, documents = await kit.ensure_corpus(servers, None)
        dsn = await _collections_database(servers.admin_dsn, source_dsn)
        embedder = LocalEmbedder()
        texts = [q["text"] for q in kit.jsonl(kit.MSMARCO / "queries.jsonl")][: args.queries]
        queries = [(t, (await embedder.embed([t]))[0]) for t in texts]
        kit.say(f"{documents} documents, {len(queries)} queries")
        share, results = await measure(dsn, queries, args.repeat, args.ef_search)
    return report(share, results, len(queries), args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.arguments("filtered_retrieval", __doc__)
    parser.add_argument("--queries", type=int, default=50, help="msmarco queries to ask (at most 50)")
    parser.add_argument("--repeat", type=int, default=3, help="timed searches per query and case")
    parser.add_argument("--ef-search", type=int, default=40, help="hnsw.ef_search (the service's default: 40)")
    args = kit.parse(parser, argv, queries=10, repeat=1)
    return kit.publish_run(SECTION, run(args), args, kit.MSMARCO / "corpus.jsonl")


if __name__ == "__main__":
    sys.exit(main())
