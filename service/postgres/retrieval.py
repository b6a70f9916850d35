"""Retrieval: pgvector HNSW (cosine), Postgres full-text, or both fused (service/policy/fusion.py).

The default is dense: on the shared sets no fusion beat it on both (docs/benchmarks.md); hybrid is
opt-in. Both candidate lists come back in one round trip; fusion is pure Python.
`hnsw.ef_search`, iterative scans and `hnsw.max_scan_tuples` are set per connection (see
`db.create_pool`), so a search filtered to a small collection or source still returns a full
top-k instead of the few rows that survive a post-filter (pgvector issue #259).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

import asyncpg
import numpy as np
import numpy.typing as npt

from service.policy.collections import valid_name
from service.policy.fusion import Fusion, fuse
from service.settings import Settings

SNIPPET_CHARS = 240

Mode = Literal["hybrid", "dense", "sparse"]
FullTextRank = Literal["ts_rank", "ts_rank_cd"]


@dataclass(frozen=True)
class Source:
    """A retrieved chunk as the prompt and the client see it; `n` is its citation number.

    `score`: cosine similarity in dense mode, the ts_rank in sparse mode, the fused score in hybrid.
    """

    n: int
    chunk_id: int
    document_id: int
    document: str  # the document's title, or its external id when untitled
    source: str
    uri: str
    text: str
    score: float
    collection: str = "default"

    def snippet(self) -> str:
        text = " ".join(self.text.split())
        return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1].rsplit(" ", 1)[0] + "…"


@dataclass(frozen=True)
class RetrievalConfig:
    """RAG_RETRIEVAL_MODE, RAG_HYBRID_FUSION, RAG_HYBRID_DENSE_WEIGHT, RAG_FULLTEXT_RANK."""

    mode: Mode = "dense"
    fusion: Fusion = "convex"
    dense_weight: float = 0.7
    rank: FullTextRank = "ts_rank"

    @classmethod
    def of(cls, settings: Settings) -> RetrievalConfig:
        return cls(
            settings.retrieval_mode, settings.hybrid_fusion, settings.hybrid_dense_weight, settings.fulltext_rank
        )


def _storable(text: str) -> bool:
    """Text Postgres can compare: no NUL, no lone surrogate (JSON's "\\ud800" decodes to one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


@dataclass(frozen=True)
class Filters:
    """What a request narrows retrieval to: sources (free tags) and collections (checked against the key)."""

    sources: tuple[str, ...] = ()
    collections: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: Mapping[str, object] | None) -> Filters:
        """Accepts {"source": "x"}, {"collection": ["a", "b"]}, both, or nothing; else a ValueError."""
        raw = dict(raw or {})
        if set(raw) - {"source", "collection"}:  # the unknown keys are not named: they are the caller's text
            raise ValueError("unknown filter key; the supported filters are source and collection")
        collections = _values(raw, "collection")
        if not all(valid_name(c) for c in collections):
            raise ValueError("filters.collection must name collections: letters, digits, '.', '_' or '-'")
        return cls(_values(raw, "source"), collections)


def _values(raw: Mapping[str, object], name: str) -> tuple[str, ...]:
    value = raw.get(name)
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"filters.{name} must be a non-empty string or list of strings")
    if not all(_storable(v) for v in values):  # a client error, not a 503 from Postgres or a 500
        raise ValueError(f"filters.{name} must be valid UTF-8 text without NUL characters")
    return tuple(sorted(set(values)))


_DENSE = """
    -- With a filter, pgvector's iterative scan (hnsw.iterative_scan = relaxed_order, set per
    -- connection in db.create_pool) keeps walking the index until $4 rows pass it, up to
    -- hnsw.max_scan_tuples; relaxed order means the rows are re-sorted by distance here.
    SELECT c.id, row_number() OVER (ORDER BY c.distance, c.id) AS rank, 1 - c.distance AS score
    FROM (SELECT id, embedding <=> $1 AS distance FROM chunks
          WHERE (cardinality($3::text[]) = 0 OR source = ANY($3::text[]))
            AND ($5::text[] IS NULL OR collection = ANY($5::text[]))
          ORDER BY embedding <=> $1 LIMIT $4) AS c
"""
_SPARSE = """
    -- Questions are prose: any term may match (OR), ranked by how many do. A query with a
    -- negation ("-word") keeps websearch's AND, or the negation would match almost everything.
    SELECT c.id, row_number() OVER (ORDER BY {rank}(c.tsv, q.text::tsquery) DESC, c.id) AS rank,
           {rank}(c.tsv, q.text::tsquery) AS score
    FROM chunks c, (
        SELECT CASE WHEN position('!' IN t) > 0 THEN t ELSE replace(t, ' & ', ' | ') END AS text
        FROM (SELECT websearch_to_tsquery('english', $2)::text AS t) AS w
    ) AS q
    WHERE q.text <> '' AND c.tsv @@ q.text::tsquery
      AND (cardinality($3::text[]) = 0 OR c.source = ANY($3::text[]))
      AND ($5::text[] IS NULL OR c.collection = ANY($5::text[]))
    ORDER BY rank LIMIT $4
"""
_SELECT = """
SELECT h.kind, h.rank, h.score::float8 AS score, c.id AS chunk_id, c.document_id, c.text, c.source, c.collection,
       coalesce(nullif(d.title, ''), d.external_id) AS document, d.uri
FROM hits h JOIN chunks c ON c.id = h.id JOIN documents d ON d.id = c.document_id
"""


@cache  # a handful of combinations, fixed at start: built once, not per search
def search_sql(mode: Mode, rank: FullTextRank) -> str:
    """One round trip for the rankings `mode` needs: $1 vector, $2 question, $3 sources, $4 limit, $5 collections."""
    parts = {"dense": _DENSE, "sparse": _SPARSE.format(rank=rank)}
    kinds = ("dense", "sparse") if mode == "hybrid" else (mode,)
    parts["typed"] = "SELECT $1::vector, $2::text"  # never read: gives the unused parameter a type
    ctes = ", ".join(f"{kind} AS ({parts[kind]})" for kind in (*kinds, "typed"))
    hits = " UNION ALL ".join(f"SELECT id, rank, score, '{kind}' AS kind FROM {kind}" for kind in kinds)  # noqa: S608 (literal kinds)
    return f"WITH {ctes}, hits AS ({hits}){_SELECT}"


class Retriever:
    def __init__(
        self, pool: asyncpg.Pool, *, candidates: int = 40, config: RetrievalConfig = RetrievalConfig()
    ) -> None:
        self.pool = pool
        self.candidates = candidates
        self.config = config

    async def search(
        self,
        query_vector: npt.NDArray[np.float32],
        question: str,
        *,
        top_k: int,
        filters: Filters = Filters(),
        collections: Sequence[str] | None = None,
        mode: Mode | None = None,
    ) -> list[Source]:
        """Top-k chunks from `collections` (None: all) in the configured mode, or `mode` (rag-eval measures each one).

        `collections` is the request's permission set (service/policy/collections.py), already
        narrowed by `filters.collections`.
        """
        mode = mode or self.config.mode
        limit = max(self.candidates, top_k * 4)
        names = None if collections is None else list(collections)
        sql = search_sql(mode, self.config.rank)
        rows = await self.pool.fetch(sql, query_vector, question, list(filters.sources), limit, names)
        by_kind: dict[str, list[tuple[int, int, float]]] = {"dense": [], "sparse": []}
        details: dict[int, asyncpg.Record] = {}
        for row in rows:
            by_kind[row["kind"]].append((row["rank"], row["chunk_id"], row["score"]))
            details[row["chunk_id"]] = row
        dense, sparse = ([(chunk, score) for _, chunk, score in sorted(by_kind[kind])] for kind in ("dense", "sparse"))
        if mode == "hybrid":
            ranked = fuse(dense, sparse, fusion=self.config.fusion, dense_weight=self.config.dense_weight)
        else:
            ranked = dense if mode == "dense" else sparse
        return [
            Source(
                n=n,
                chunk_id=chunk_id,
                document_id=details[chunk_id]["document_id"],
                document=details[chunk_id]["document"],
                source=details[chunk_id]["source"],
                collection=details[chunk_id]["collection"],
                uri=details[chunk_id]["uri"],
                text=details[chunk_id]["text"],
                score=round(score, 6),
            )
            for n, (chunk_id, score) in enumerate(ranked[:top_k], start=1)
        ]
