"""Ingest end to end against a real Postgres+pgvector and the real MiniLM model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import numpy as np
import pytest
from typer.testing import CliRunner

from ingest.cli import app as ingest_app
from ingest.loaders import SourceDocument
from ingest.pipeline import IngestOptions, ingest_documents
from service.postgres.corpus import Corpus, open_corpus
from service.postgres.db import CorpusMismatchError, SchemaParams, load_migrations, migrate
from service.settings import Settings
from tests.support.documents import paragraphs, write_pages

OPTIONS = IngestOptions(chunk_tokens=120, chunk_overlap=20, window=16)


def doc(external_id: str, text: str, source: str = "notes", title: str = "") -> SourceDocument:
    return SourceDocument(source, external_id, f"mem://{external_id}", title or external_id, text)


async def chunk_rows(pool: asyncpg.Pool, external_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        """SELECT c.id, c.ordinal, c.text FROM chunks c JOIN documents d ON d.id = c.document_id
           WHERE d.external_id = $1 ORDER BY c.ordinal""",
        external_id,
    )
    return rows


async def test_reingest_unchanged_computes_no_embeddings(corpus: Corpus) -> None:
    assert corpus.embedder is not None
    docs = [doc("a", paragraphs("caching", 12)), doc("b", paragraphs("routing", 3)), doc("c", "One short note.")]
    first = await ingest_documents(corpus.store, corpus.embedder, docs, OPTIONS)
    assert (first.added, first.updated, first.unchanged) == (3, 0, 0)
    assert first.chunks > 3 and first.embeddings_computed == first.chunks
    before = await corpus.pool.fetch("SELECT id, embedding FROM chunks ORDER BY id")

    again = await ingest_documents(corpus.store, corpus.embedder, docs, OPTIONS)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 3)
    assert again.embeddings_computed == 0 and again.chunks == 0
    after = await corpus.pool.fetch("SELECT id, embedding FROM chunks ORDER BY id")
    assert [r["id"] for r in after] == [r["id"] for r in before]

    status = await corpus.store.status()
    assert (status.documents, status.chunks) == (3, first.chunks)
    assert status.tokens == first.tokens
    # stored vectors are unit length (cosine-ready) and of the model's dimension
    vector = after[0]["embedding"].to_numpy()
    assert vector.shape == (384,) and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3


async def test_changed_document_replaces_only_its_chunks(corpus: Corpus) -> None:
    assert corpus.embedder is not None
    docs = [doc("a", paragraphs("caching", 10)), doc("b", paragraphs("routing", 10))]
    await ingest_documents(corpus.store, corpus.embedder, docs, OPTIONS)
    untouched = await chunk_rows(corpus.pool, "b")
    generation = await corpus.store.corpus_version()

    changed = doc("a", paragraphs("eviction", 4))
    report = await ingest_documents(corpus.store, corpus.embedder, [changed, docs[1]], OPTIONS)

    assert (report.added, report.updated, report.unchanged) == (0, 1, 1)
    new_rows = await chunk_rows(corpus.pool, "a")
    assert report.embeddings_computed == len(new_rows) == report.chunks
    assert all("eviction" in r["text"] for r in new_rows)
    assert [r["ordinal"] for r in new_rows] == list(range(len(new_rows)))
    assert await chunk_rows(corpus.pool, "b") == untouched  # same ids, same text
    assert await corpus.store.corpus_version() == generation + 1
    orphans = await corpus.pool.fetchval(
        "SELECT count(*) FROM chunks c LEFT JOIN documents d ON d.id = c.document_id WHERE d.id IS NULL"
    )
    assert orphans == 0


async def test_readers_see_old_or_new_version_never_a_mix(corpus: Corpus) -> None:
    assert corpus.embedder is not None
    await ingest_documents(corpus.store, corpus.embedder, [doc("big", paragraphs("alpha", 40))], OPTIONS)
    snapshots: list[set[str]] = []
    done = asyncio.Event()

    async def reader() -> None:
        while not done.is_set():
            rows = await chunk_rows(corpus.pool, "big")
            snapshots.append({"alpha" if "alpha" in r["text"] else "beta" for r in rows})
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    await ingest_documents(corpus.store, corpus.embedder, [doc("big", paragraphs("beta", 40))], OPTIONS)
    done.set()
    await task
    assert snapshots, "the reader never ran"
    assert all(len(kinds) == 1 for kinds in snapshots), "a reader saw chunks of two versions at once"
    after = await chunk_rows(corpus.pool, "big")  # a read that starts after the write returned
    assert {"beta" if "beta" in r["text"] else "alpha" for r in after} == {"beta"}


async def test_delete_by_source_and_by_id(corpus: Corpus) -> None:
    assert corpus.embedder is not None
    docs = [doc("a", "Alpha text."), doc("b", "Beta text."), doc("c", "Gamma text.", source="other")]
    await ingest_documents(corpus.store, corpus.embedder, docs, OPTIONS)
    assert await corpus.store.delete_documents(source="notes", external_ids=["a"]) == 1
    assert await corpus.store.delete_documents(source="missing") == 0
    assert await corpus.store.delete_documents(source="other") == 1
    status = await corpus.store.status()
    assert (status.documents, status.chunks, list(status.sources)) == (1, 1, ["notes"])


async def test_real_model_ranks_the_relevant_chunk_first(corpus: Corpus) -> None:
    """Embeddings are meaningful: cosine search over pgvector finds the document about the topic."""
    assert corpus.embedder is not None
    docs = [
        doc("cache", "To flush the answer cache, run rag-admin cache flush. It deletes cached answers."),
        doc("pdf", "PDF files are parsed with pypdf; scanned PDFs without a text layer are rejected."),
        doc("keys", "API keys are stored as hashes. Revoke a key with rag-admin keys revoke."),
    ]
    await ingest_documents(corpus.store, corpus.embedder, docs, OPTIONS)
    query = (await corpus.embedder.embed(["how do I empty the cache?"]))[0]
    best = await corpus.pool.fetchval(
        """SELECT d.external_id FROM chunks c JOIN documents d ON d.id = c.document_id
           ORDER BY c.embedding <=> $1 LIMIT 1""",
        query,
    )
    assert best == "cache"


async def test_migrate_refuses_a_different_embedding_model(database_url: str) -> None:
    params = SchemaParams("sentence-transformers/all-MiniLM-L6-v2", 384)
    assert await migrate(database_url, params) == [m.version for m in load_migrations()]
    assert await migrate(database_url, params) == []  # idempotent
    with pytest.raises(CorpusMismatchError, match=r"all-MiniLM-L6-v2.*text-embedding-3-small"):
        await migrate(database_url, SchemaParams("text-embedding-3-small", 1536))


def test_cli_sync_adds_changes_and_deletes(cli: CliRunner, tmp_path: Path) -> None:
    folder = write_pages(tmp_path / "kb", {"one.md": "# One\n\nThe first page.", "two.md": "# Two\n\nThe second page."})
    first = cli.invoke(ingest_app, ["sync", str(folder), "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["added"] == 2

    (folder / "two.md").unlink()
    (folder / "three.md").write_text("# Three\n\nThe third page.")
    second = cli.invoke(ingest_app, ["sync", str(folder), "--json"])
    result = json.loads(second.stdout)
    assert (result["added"], result["unchanged"], result["deleted"]) == (1, 1, 1)

    status = json.loads(cli.invoke(ingest_app, ["status", "--json"]).stdout)
    assert status["documents"] == 2

    deleted = cli.invoke(ingest_app, ["delete", "--source", "kb", "--id", "one.md", "--json"])
    assert json.loads(deleted.stdout) == {"deleted": 1}
    assert cli.invoke(ingest_app, ["delete"]).exit_code == 2


def test_cli_sync_refuses_an_unknown_format_like_add(cli: CliRunner, tmp_path: Path) -> None:
    """`sync --format xml` used to ingest the folder as `auto`; now both commands refuse it before any work."""
    folder = write_pages(tmp_path / "kb", {"one.md": "# One\n\nThe first page."})
    for command in (["add", str(folder)], ["sync", str(folder)]):
        run = cli.invoke(ingest_app, [*command, "--format", "xml"])
        assert run.exit_code == 2, run.output
        assert "--format must be auto, jsonl or beir, not 'xml'" in run.output


async def test_open_corpus_with_embedder_uses_settings_model(settings: Settings) -> None:
    async with open_corpus(settings, with_embedder=True) as opened:
        assert opened.embedder is not None
        assert (opened.embedder.model, opened.embedder.dim) == ("sentence-transformers/all-MiniLM-L6-v2", 384)
        row = await opened.pool.fetchrow("SELECT embedding_model, embedding_dim FROM corpus")
        assert tuple(row) == ("sentence-transformers/all-MiniLM-L6-v2", 384)


async def test_open_corpus_searches_with_the_settings_hnsw_parameters(settings: Settings) -> None:
    """rag-eval measures through open_corpus's pool, which used to keep pgvector's defaults."""
    tuned = settings.model_copy(update={"hnsw_ef_search": 77, "hnsw_max_scan_tuples": 5000})
    async with open_corpus(tuned) as opened, opened.pool.acquire() as conn:
        assert await conn.fetchval("SHOW hnsw.ef_search") == "77"
        assert await conn.fetchval("SHOW hnsw.max_scan_tuples") == "5000"
