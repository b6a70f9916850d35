"""Retrieval on the real Postgres+pgvector: pool session settings and the full-text query."""

from __future__ import annotations

from ingest.loaders import SourceDocument
from ingest.pipeline import IngestOptions, ingest_documents
from service.postgres.corpus import Corpus
from service.postgres.db import SchemaParams, create_pool, migrate
from service.postgres.retrieval import Retriever


async def test_pool_keeps_hnsw_settings_after_connections_are_reused(database_url: str) -> None:
    """asyncpg resets session state on release; the HNSW settings must survive it."""
    await migrate(database_url, SchemaParams("m", 3))
    pool = await create_pool(database_url, min_size=1, max_size=1, ef_search=77)
    try:
        for _ in range(3):  # the same connection, acquired and released (RESET ALL) each time
            async with pool.acquire() as conn:
                assert await conn.fetchval("SHOW hnsw.ef_search") == "77"
                assert await conn.fetchval("SHOW hnsw.iterative_scan") == "relaxed_order"
    finally:
        await pool.close()


async def test_full_text_ors_terms_but_keeps_negations(corpus: Corpus) -> None:
    assert corpus.embedder is not None
    docs = [
        SourceDocument("s", "py", "m://py", "", "Python snakes are large reptiles."),
        SourceDocument("s", "lang", "m://lang", "", "Python is a programming language."),
        SourceDocument("s", "other", "m://other", "", "Bananas are yellow fruit."),
    ]
    await ingest_documents(corpus.store, corpus.embedder, docs, IngestOptions(window=8))
    retriever = Retriever(corpus.pool)
    vector = (await corpus.embedder.embed(["x"]))[0]

    async def sparse(question: str) -> set[str]:
        found = await retriever.search(vector, question, top_k=5, mode="sparse")
        rows = await corpus.pool.fetch("SELECT id, external_id FROM documents")
        names = {r["id"]: r["external_id"] for r in rows}
        return {names[s.document_id] for s in found}

    assert await sparse("python reptiles") == {"py", "lang"}  # OR: either term is enough
    assert await sparse("python -snake") == {"lang"}  # a negation is not turned into "or not snake"
