"""The corpus in Postgres: documents and their chunks.

Every change is one transaction that also bumps the corpus version (column
`corpus.generation`) and NOTIFYs listeners, so a reader sees either the old or the new
version of a document, never a mix, and the answer cache learns about it without polling.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

from service.postgres.db import NOTIFY_CHANNEL

DocumentKey = tuple[str, str, str]  # (collection, source, external_id)


@dataclass(frozen=True)
class ChunkRecord:
    ordinal: int
    text: str
    token_count: int


@dataclass
class PreparedDocument:
    """A document ready to write: chunked, hashed and embedded."""

    source: str
    external_id: str
    uri: str
    title: str
    content_hash: str
    metadata: dict[str, Any]
    chunks: Sequence[ChunkRecord]
    embeddings: npt.NDArray[np.float32] | None = None
    collection: str = "default"

    @property
    def key(self) -> DocumentKey:
        return (self.collection, self.source, self.external_id)

    @property
    def token_count(self) -> int:
        return sum(c.token_count for c in self.chunks)


@dataclass(frozen=True)
class WriteResult:
    corpus_version: int  # the version this write created
    inserted: int
    updated: int
    chunks: int


@dataclass
class CorpusStatus:
    initialised: bool
    embedding_model: str | None = None
    embedding_dim: int | None = None
    generation: int = 0  # the corpus version (column corpus.generation; a key of `rag-ingest status --json`)
    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    hnsw_index: bool = False
    fulltext_index: bool = False
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    collections: dict[str, dict[str, int]] = field(default_factory=dict)


_CHUNK_COLUMNS = ("document_id", "source", "collection", "ordinal", "text", "token_count", "embedding")


class DocumentStore:
    """Documents and their chunks: atomic writes and deletes, each bumping the corpus version."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def content_hashes(self, keys: Iterable[DocumentKey]) -> dict[DocumentKey, str]:
        keys = list(keys)
        if not keys:
            return {}
        rows = await self.pool.fetch(
            """SELECT d.collection, d.source, d.external_id, d.content_hash
               FROM documents d
               JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(collection, source, external_id)
                 ON d.collection = k.collection AND d.source = k.source AND d.external_id = k.external_id""",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
        )
        return {(r["collection"], r["source"], r["external_id"]): r["content_hash"] for r in rows}

    async def external_ids(self, source: str, collection: str = "default") -> set[str]:
        rows = await self.pool.fetch(
            "SELECT external_id FROM documents WHERE source = $1 AND collection = $2", source, collection
        )
        return {r["external_id"] for r in rows}

    async def write_documents(self, docs: Sequence[PreparedDocument]) -> WriteResult:
        """Insert or replace whole documents (row and every chunk) in one transaction."""
        if not docs:
            raise ValueError("nothing to write")
        async with self.pool.acquire() as conn, conn.transaction():
            version = await _bump_corpus_version(conn)
            rows = await conn.fetch(
                """INSERT INTO documents AS d (source, external_id, uri, title, content_hash, metadata,
                                               token_count, chunk_count, generation, collection)
                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                        $6::jsonb[], $7::int[], $8::int[], $9::bigint[], $10::text[])
                   ON CONFLICT (collection, source, external_id) DO UPDATE SET
                       uri = excluded.uri, title = excluded.title, content_hash = excluded.content_hash,
                       metadata = excluded.metadata, token_count = excluded.token_count,
                       chunk_count = excluded.chunk_count, generation = excluded.generation,
                       updated_at = now()
                   RETURNING id, collection, source, external_id, (xmax <> 0) AS replaced""",
                [d.source for d in docs],
                [d.external_id for d in docs],
                [d.uri for d in docs],
                [d.title for d in docs],
                [d.content_hash for d in docs],
                [json.dumps(d.metadata) for d in docs],
                [d.token_count for d in docs],
                [len(d.chunks) for d in docs],
                [version] * len(docs),
                [d.collection for d in docs],
            )
            ids = {(r["collection"], r["source"], r["external_id"]): r["id"] for r in rows}
            replaced = [r["id"] for r in rows if r["replaced"]]
            if replaced:
                await conn.execute("DELETE FROM chunks WHERE document_id = ANY($1::bigint[])", replaced)
                await _log_changes(conn, version, replaced)
            records = [
                (ids[doc.key], doc.source, doc.collection, chunk.ordinal, chunk.text, chunk.token_count, vector)
                for doc in docs
                for chunk, vector in zip(doc.chunks, _vectors(doc), strict=True)
            ]
            await conn.copy_records_to_table("chunks", records=records, columns=_CHUNK_COLUMNS)
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(version))
        return WriteResult(version, len(rows) - len(replaced), len(replaced), len(records))

    async def delete_documents(
        self, *, source: str | None = None, external_ids: Sequence[str] = (), collection: str = "default"
    ) -> int:
        """Delete by source, by external ids (optionally within a source), or both; always within one collection."""
        if source is None and not external_ids:
            raise ValueError("give a source or ids")
        conditions: list[str] = ["collection = $1"]
        args: list[Any] = [collection]
        if source is not None:
            args.append(source)
            conditions.append(f"source = ${len(args)}")
        if external_ids:
            args.append(list(external_ids))
            conditions.append(f"external_id = ANY(${len(args)}::text[])")
        async with self.pool.acquire() as conn, conn.transaction():
            deleted = await conn.fetch(
                f"DELETE FROM documents WHERE {' AND '.join(conditions)} RETURNING id",  # noqa: S608 fixed fragments
                *args,
            )
            if deleted:
                version = await _bump_corpus_version(conn)
                await _log_changes(conn, version, [r["id"] for r in deleted])
                await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(version))
        return len(deleted)

    async def corpus_version(self) -> int:
        """Bumped by every write and delete (stored as column corpus.generation)."""
        value = await self.pool.fetchval("SELECT generation FROM corpus")
        return int(value or 0)

    async def status(self) -> CorpusStatus:
        return await corpus_status(self.pool)


async def _bump_corpus_version(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("UPDATE corpus SET generation = generation + 1 RETURNING generation"))


async def _log_changes(conn: asyncpg.Connection, version: int, document_ids: list[int]) -> None:
    await conn.execute(
        "INSERT INTO corpus_changes (generation, document_id) SELECT $1, unnest($2::bigint[])",
        version,
        document_ids,
    )


async def changes_since(pool: asyncpg.Pool, version: int) -> tuple[int, list[int]]:
    """The current corpus version and the documents replaced or deleted after `version`."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        current = int(await conn.fetchval("SELECT generation FROM corpus"))
        rows = await conn.fetch(
            "SELECT DISTINCT document_id FROM corpus_changes WHERE generation > $1 AND generation <= $2",
            version,
            current,
        )
    return current, [r["document_id"] for r in rows]


def _vectors(doc: PreparedDocument) -> npt.NDArray[np.float32]:
    if doc.embeddings is None or len(doc.embeddings) != len(doc.chunks):
        raise ValueError(f"document {doc.key} has {len(doc.chunks)} chunks but no matching embeddings")
    return doc.embeddings


async def corpus_status(pool: asyncpg.Pool | asyncpg.Connection) -> CorpusStatus:
    """Counts for `rag-ingest status`; works on a database not yet migrated."""
    exists = await pool.fetchval("SELECT to_regclass('public.corpus') IS NOT NULL")
    if not exists:
        return CorpusStatus(initialised=False)
    corpus = await pool.fetchrow("SELECT embedding_model, embedding_dim, generation FROM corpus")
    sources = _counts(
        await pool.fetch(
            """SELECT source AS name, count(*) AS documents, sum(chunk_count) AS chunks, sum(token_count) AS tokens
               FROM documents GROUP BY source ORDER BY source"""
        )
    )
    has_collections = await pool.fetchval(
        """SELECT EXISTS (SELECT 1 FROM information_schema.columns
                          WHERE table_name = 'documents' AND column_name = 'collection')"""
    )
    collections = (
        _counts(
            await pool.fetch(
                """SELECT collection AS name, count(*) AS documents, sum(chunk_count) AS chunks,
                          sum(token_count) AS tokens
                   FROM documents GROUP BY collection ORDER BY collection"""
            )
        )
        if has_collections
        else {}
    )
    indexes = {r["indexname"] for r in await pool.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'chunks'")}
    return CorpusStatus(
        initialised=corpus is not None,
        embedding_model=corpus["embedding_model"] if corpus else None,
        embedding_dim=corpus["embedding_dim"] if corpus else None,
        generation=corpus["generation"] if corpus else 0,
        documents=sum(s["documents"] for s in sources.values()),
        chunks=sum(s["chunks"] for s in sources.values()),
        tokens=sum(s["tokens"] for s in sources.values()),
        hnsw_index="chunks_embedding_hnsw" in indexes,
        fulltext_index="chunks_tsv_gin" in indexes,
        sources=sources,
        collections=collections,
    )


def _counts(rows: list[asyncpg.Record]) -> dict[str, dict[str, int]]:
    """Documents, chunks and tokens per `name` (a source or a collection)."""
    return {
        r["name"]: {"documents": r["documents"], "chunks": int(r["chunks"]), "tokens": int(r["tokens"])} for r in rows
    }
