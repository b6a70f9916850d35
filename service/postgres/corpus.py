"""Opening the corpus database: embedded server if needed, migrations, pool, embedder.

Shared by the API's lifespan and the CLIs so they agree on one corpus and one model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from service.embedded import EmbeddedPostgres, start_postgres
from service.embeddings.encoders import KNOWN_DIMENSIONS, AnyEmbedder, create_embedder
from service.postgres.db import SchemaParams, create_pool, migrate
from service.postgres.documents import DocumentStore
from service.settings import Settings


@dataclass
class Corpus:
    pool: asyncpg.Pool
    store: DocumentStore
    embedder: AnyEmbedder | None


def database_url(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """DATABASE_URL, or an embedded server under RAG_DATA_DIR (started or reused)."""
    if settings.database_url:
        return settings.database_url, None
    server = start_postgres(settings.data_dir)
    return server.url, server


def schema_params(settings: Settings, embedder: AnyEmbedder | None = None) -> SchemaParams:
    model = settings.resolved_embedding_model()
    dim = embedder.dim if embedder else (settings.embedding_dim or KNOWN_DIMENSIONS.get(model))
    if dim is None:
        dim = create_embedder(settings).dim
    return SchemaParams(model, dim, settings.hnsw_m, settings.hnsw_ef_construction)


@asynccontextmanager
async def open_corpus(
    settings: Settings, *, with_embedder: bool = False, migrate_schema: bool = True
) -> AsyncIterator[Corpus]:
    """Migrate (refusing a corpus built with another embedding model) and open a pool that searches
    with the settings' HNSW parameters (RAG_HNSW_EF_SEARCH, RAG_HNSW_MAX_SCAN_TUPLES)."""
    dsn, _server = database_url(settings)
    embedder = create_embedder(settings) if with_embedder else None
    if migrate_schema:
        await migrate(dsn, schema_params(settings, embedder))
    pool = await create_pool(
        dsn,
        min_size=1,
        max_size=4,
        ef_search=settings.hnsw_ef_search,
        max_scan_tuples=settings.hnsw_max_scan_tuples,
    )
    try:
        yield Corpus(pool, DocumentStore(pool), embedder)
    finally:
        await pool.close()
