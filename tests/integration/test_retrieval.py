"""Retrieval on the real Postgres+pgvector: pool session settings, the full-text query, the retrieval modes."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.loaders import SourceDocument
from ingest.pipeline import IngestOptions, ingest_documents
from service.postgres.corpus import Corpus
from service.postgres.db import SchemaParams, create_pool, migrate
from service.postgres.retrieval import RetrievalConfig, Retriever
from service.settings import Settings


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


async def ingest(corpus: Corpus, texts: dict[str, str]) -> dict[int, str]:
    """Each text as a document named by its key; returns documents.id -> that name."""
    assert corpus.embedder is not None
    docs = [SourceDocument("s", name, f"m://{name}", "", text) for name, text in texts.items()]
    await ingest_documents(corpus.store, corpus.embedder, docs, IngestOptions(window=8))
    return {r["id"]: r["external_id"] for r in await corpus.pool.fetch("SELECT id, external_id FROM documents")}


async def test_full_text_ors_terms_but_keeps_negations(corpus: Corpus) -> None:
    texts = {"py": "Python snakes are large reptiles.", "lang": "Python is a programming language."}
    names = await ingest(corpus, {**texts, "other": "Bananas are yellow fruit."})
    retriever = Retriever(corpus.pool)
    assert corpus.embedder is not None
    vector = (await corpus.embedder.embed(["x"]))[0]

    async def sparse(question: str) -> set[str]:
        found = await retriever.search(vector, question, top_k=5, mode="sparse")
        return {names[s.document_id] for s in found}

    assert await sparse("python reptiles") == {"py", "lang"}  # OR: either term is enough
    assert await sparse("python -snake") == {"lang"}  # a negation is not turned into "or not snake"


async def test_dense_is_the_default_and_hybrid_is_opt_in(corpus: Corpus, settings: Settings) -> None:
    """Dense by default (scores are cosine similarities); the configured hybrid fusion adds full-text matches."""
    kettle = "Water boils at a lower temperature high in the mountains."
    code = "Error XK-4471 means the zorblat flux capacitor is unplugged."
    names = await ingest(corpus, {"kettle": kettle, "code": code, "fruit": "Bananas are yellow fruit."})
    assert corpus.embedder is not None
    question = "why does tea brew poorly at altitude XK-4471"
    vector = (await corpus.embedder.embed([question]))[0]

    default = Retriever(corpus.pool, config=RetrievalConfig.of(settings))
    dense = await default.search(vector, question, top_k=3)
    assert dense == await default.search(vector, question, top_k=3, mode="dense")
    top = next(s for s in dense if names[s.document_id] == "kettle")
    expected = (await corpus.embedder.embed([kettle]))[0]
    assert top.score == pytest.approx(float(np.dot(vector, expected)), abs=1e-3)  # cosine (unit vectors)

    sparse = await default.search(vector, question, top_k=3, mode="sparse")
    assert [names[s.document_id] for s in sparse] == ["code"]
    for fusion in ("convex", "rrf"):
        hybrid_settings = settings.model_copy(update={"retrieval_mode": "hybrid", "hybrid_fusion": fusion})
        hybrid = Retriever(corpus.pool, config=RetrievalConfig.of(hybrid_settings))
        fused = await hybrid.search(vector, question, top_k=3)
        assert {names[s.document_id] for s in fused[:2]} == {"kettle", "code"}, fusion
