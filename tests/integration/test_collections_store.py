"""Collections in Postgres (issue 13): the migration, documents per collection, keys' collections,
and the CLIs that manage them (`rag-ingest --collection`, `rag-admin keys create/update/list`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner

from ingest.cli import app as ingest_app
from ingest.loaders import SourceDocument
from ingest.pipeline import IngestOptions, ingest_documents
from service.cli.admin import app as admin_app
from service.http.auth import KEYS_CHANNEL, KeyStore
from service.postgres.corpus import Corpus, open_corpus
from service.postgres.db import SchemaParams, load_migrations, migrate, render
from service.settings import Settings
from tests.support.documents import write_pages

OPTIONS = IngestOptions(chunk_tokens=120, chunk_overlap=20, window=16)
PARAMS = SchemaParams("sentence-transformers/all-MiniLM-L6-v2", 384)


async def _before_collections(conn: asyncpg.Connection) -> None:
    """The schema as it was before collections, with a document and two keys in it."""
    await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL)")
    for migration in (m for m in load_migrations() if m.version < 6):
        await conn.execute(render(migration.sql, PARAMS))
        await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2)", migration.version, migration.name)
    await conn.execute(
        "INSERT INTO corpus (embedding_model, embedding_dim) VALUES ($1, $2)",
        PARAMS.embedding_model,
        PARAMS.embedding_dim,
    )
    await conn.execute(
        """INSERT INTO documents (source, external_id, uri, content_hash, token_count, chunk_count, generation)
           VALUES ('kb', 'a.md', 'mem://a', 'h', 1, 0, 0)"""
    )
    for key_id, scopes in (("queryqueryqu", ["query"]), ("adminadminad", ["query", "admin"])):
        await conn.execute(
            "INSERT INTO api_keys (id, name, secret_sha256, scopes) VALUES ($1, $1, '\\x00', $2)", key_id, scopes
        )


async def test_the_migration_puts_existing_documents_in_default_and_keys_by_scope(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await _before_collections(conn)
        assert await migrate(database_url, PARAMS) == [m.version for m in load_migrations() if m.version >= 6]
        assert await conn.fetchval("SELECT collection FROM documents") == "default"
        keys = dict(await conn.fetch("SELECT id, collections FROM api_keys"))
        assert keys == {"queryqueryqu": ["default"], "adminadminad": ["*"]}
        # unique per (collection, source, path): the same path may exist in another collection
        await conn.execute(
            """INSERT INTO documents (collection, source, external_id, uri, content_hash, token_count,
                                      chunk_count, generation)
               VALUES ('hr', 'kb', 'a.md', 'mem://a', 'h', 1, 0, 0)"""
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                """INSERT INTO documents (source, external_id, uri, content_hash, token_count, chunk_count, generation)
                   VALUES ('kb', 'a.md', 'mem://a', 'h', 1, 0, 0)"""
            )
    finally:
        await conn.close()


def _doc(collection: str, external_id: str, text: str) -> SourceDocument:
    uri = f"mem://{collection}/{external_id}"
    return SourceDocument("kb", external_id, uri, external_id, text, collection=collection)


async def test_documents_live_in_one_collection_each(corpus: Corpus) -> None:
    assert corpus.embedder is not None
    docs = [_doc("hr", "leave.md", "Leave is 25 days."), _doc("finance", "leave.md", "Budget closes in May.")]
    report = await ingest_documents(corpus.store, corpus.embedder, docs, OPTIONS)
    assert (report.added, report.updated) == (2, 0)  # the same path twice, in two collections
    rows = await corpus.pool.fetch("SELECT collection, count(*) FROM chunks GROUP BY collection ORDER BY 1")
    assert [tuple(r) for r in rows] == [("finance", 1), ("hr", 1)]  # chunks carry their document's collection
    assert await corpus.store.external_ids("kb", "hr") == {"leave.md"}
    assert await corpus.store.external_ids("kb") == set()  # nothing in `default`
    assert await corpus.store.delete_documents(source="kb", external_ids=["leave.md"]) == 0
    assert await corpus.store.delete_documents(source="kb", external_ids=["leave.md"], collection="hr") == 1
    status = await corpus.store.status()
    assert status.collections == {"finance": {"documents": 1, "chunks": 1, "tokens": status.tokens}}


async def test_keys_are_created_and_updated_with_their_collections(settings: Settings) -> None:
    async with open_corpus(settings) as corpus:
        store = KeyStore(corpus.pool)
        _, query = await store.create("q")
        _, admin = await store.create("a", "admin")
        _, hr = await store.create("hr", collections=["hr", "handbook", "hr"])
        assert (query.collections, admin.collections, hr.collections) == (("default",), ("*",), ("handbook", "hr"))
        for bad in ([], ["*", "hr"], ["no spaces"]):
            with pytest.raises(ValueError):
                await store.create("bad", collections=bad)

        listener = await asyncpg.connect(str(settings.database_url))
        notified: asyncio.Queue[str] = asyncio.Queue()
        await listener.add_listener(KEYS_CHANNEL, lambda *args: notified.put_nowait(args[3]))
        try:
            updated = await store.update(hr.id, {"collections": "finance"})
            assert updated is not None and updated.collections == ("finance",)
            assert await asyncio.wait_for(notified.get(), 10) == hr.id  # every worker forgets the cached key
        finally:
            await listener.close()
        stored = await store.get(hr.id)
        assert stored is not None and stored.collections == ("finance",)
        with pytest.raises(ValueError):
            await store.update(hr.id, {"collections": []})
        with pytest.raises(ValueError):
            await store.update(hr.id, {"name": "renamed"})  # only listed fields may change
        await store.revoke(query.id)
        assert await store.update(query.id, {"collections": ["hr"]}) is None  # a revoked key stays revoked


def test_ingest_delete_migrates_a_corpus_from_before_collections(settings: Settings, cli: CliRunner) -> None:
    async def old() -> None:
        conn = await asyncpg.connect(str(settings.database_url))
        try:
            await _before_collections(conn)
        finally:
            await conn.close()

    asyncio.run(old())
    deleted = cli.invoke(ingest_app, ["delete", "--source", "kb", "--json"])
    assert deleted.exit_code == 0, deleted.output
    assert json.loads(deleted.stdout) == {"deleted": 1}  # the old document, now in `default`


def test_admin_cli_creates_updates_and_lists_collections(cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    created = cli.invoke(admin_app, ["keys", "create", "--name", "hr", "--collections", "hr,handbook", "--json"])
    assert created.exit_code == 0, created.output
    key = json.loads(created.stdout)
    assert key["collections"] == ["handbook", "hr"]
    plain = json.loads(cli.invoke(admin_app, ["keys", "create", "--name", "q", "--json"]).stdout)
    assert plain["collections"] == ["default"]

    updated = cli.invoke(admin_app, ["keys", "update", key["id"], "--collections", "*", "--json"])
    assert updated.exit_code == 0, updated.output
    assert json.loads(updated.stdout)["collections"] == ["*"]
    keys = json.loads(cli.invoke(admin_app, ["keys", "list", "--json"]).stdout)
    assert {k["id"]: k["collections"] for k in keys} == {key["id"]: ["*"], plain["id"]: ["default"]}
    monkeypatch.setenv("COLUMNS", "200")  # the whole table, not one cut to a terminal's width
    table = cli.invoke(admin_app, ["keys", "list"]).stdout
    assert "collections" in table and "default" in table

    assert cli.invoke(admin_app, ["keys", "create", "--name", "x", "--collections", "a b"]).exit_code == 2
    assert cli.invoke(admin_app, ["keys", "update", key["id"]]).exit_code == 2  # nothing to update
    assert cli.invoke(admin_app, ["keys", "update", "nosuchkey000", "--collections", "hr"]).exit_code == 1


def test_ingest_cli_takes_a_collection(cli: CliRunner, tmp_path: Path) -> None:
    folder = write_pages(tmp_path / "kb", {"one.md": "# One\n\nThe first page."})
    for collection in ("hr", "finance"):
        synced = cli.invoke(ingest_app, ["sync", str(folder), "--collection", collection, "--json"])
        assert synced.exit_code == 0, synced.output
        assert json.loads(synced.stdout)["added"] == 1
    # a sync of an emptied folder deletes only within its own collection
    (folder / "one.md").unlink()
    emptied = cli.invoke(ingest_app, ["sync", str(folder), "--collection", "hr", "--json"])
    assert json.loads(emptied.stdout)["deleted"] == 1
    status = json.loads(cli.invoke(ingest_app, ["status", "--json"]).stdout)
    assert set(status["collections"]) == {"finance"}
    assert "collection finance" in cli.invoke(ingest_app, ["status"]).stdout

    deleted = cli.invoke(ingest_app, ["delete", "--source", "kb", "--collection", "finance", "--json"])
    assert json.loads(deleted.stdout) == {"deleted": 1}
    assert cli.invoke(ingest_app, ["delete", "--source", "kb", "--collection", "../x"]).exit_code == 2
