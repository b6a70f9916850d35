"""`rag-ingest` as its own process against the real servers: clear errors, partial failures, kill -9 mid-ingest."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from service.postgres.db import SchemaParams, migrate
from service.settings import Settings
from tests.support.documents import paragraphs
from tests.support.servers import BIN, cli_env, wait_until


def test_cli_refuses_model_mismatch_with_a_clear_message(settings: Settings, tmp_path: Path) -> None:
    note = tmp_path / "note.md"
    note.write_text("# Note\n\nSome text.")
    env = cli_env(settings)
    subprocess.run([BIN / "rag-ingest", "status"], env=env, check=True, capture_output=True)
    asyncio.run(migrate(str(settings.database_url), SchemaParams("sentence-transformers/all-MiniLM-L6-v2", 384)))
    env.update(RAG_EMBEDDING_PROVIDER="openai", OPENAI_BASE_URL="http://127.0.0.1:9", OPENAI_API_KEY="x")
    run = subprocess.run([BIN / "rag-ingest", "add", str(note)], env=env, capture_output=True, text=True)
    assert run.returncode == 2
    assert "all-MiniLM-L6-v2" in run.stderr and "text-embedding-3-small" in run.stderr
    assert "Traceback" not in run.stderr


def write_tree(root: Path) -> None:
    (root / "guide").mkdir(parents=True)
    (root / "guide" / "start.md").write_text("# Start\n\n" + paragraphs("starting", 8))
    (root / "guide" / "stop.txt").write_text(paragraphs("stopping", 2))
    (root / "page.html").write_text("<html><title>Glossary</title><body><h1>Terms</h1><p>RRF fuses rankings.</p>")
    (root / "records.jsonl").write_text(
        '{"id": "r1", "title": "One", "text": "First record."}\n'
        "{not json}\n"
        '{"id": "r2", "title": "Two", "text": "Second record."}\n'
    )
    (root / "blob.txt").write_bytes(b"\x00\x01binary\x00")
    (root / "empty.md").write_text("")


def test_cli_add_reports_bad_files_and_ingests_the_rest(settings: Settings, tmp_path: Path) -> None:
    tree = tmp_path / "corpus"
    write_tree(tree)
    env = cli_env(settings)
    run = subprocess.run(
        [BIN / "rag-ingest", "add", str(tree), "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1, run.stderr  # something failed, the rest went in
    summary = json.loads(run.stdout)
    failed = {Path(f["path"]).name: f["reason"] for f in summary["failures"]}
    assert set(failed) == {"blob.txt", "empty.md", "records.jsonl:2"}
    assert "binary" in failed["blob.txt"] and "empty" in failed["empty.md"] and "JSON" in failed["records.jsonl:2"]
    assert summary["added"] == 5  # start.md, stop.txt, page.html, r1, r2
    assert "Traceback" not in run.stderr

    status = subprocess.run([BIN / "rag-ingest", "status", "--json"], env=env, capture_output=True, text=True)
    info = json.loads(status.stdout)
    assert info["documents"] == 5 and info["sources"] == {"corpus": info["sources"]["corpus"]}
    assert info["chunks"] == summary["chunks"] and info["embedding_dim"] == 384
    assert info["hnsw_index"] and info["fulltext_index"]


def test_sigkill_mid_ingest_then_rerun_leaves_exact_corpus(settings: Settings, tmp_path: Path) -> None:
    """Kill -9 while batches are being written; the rerun finishes the job with no duplicates."""
    corpus_file = tmp_path / "many" / "corpus.jsonl"
    corpus_file.parent.mkdir()
    n = 800
    with corpus_file.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"_id": f"d{i}", "title": "", "text": f"Passage {i} about topic {i % 37}."}) + "\n")
    env = cli_env(settings, RAG_EMBED_WINDOW="4")
    cmd = [str(BIN / "rag-ingest"), "add", str(corpus_file), "--format", "beir", "--json"]

    async def count() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            exists = await conn.fetchval("SELECT to_regclass('public.documents') IS NOT NULL")
            return int(await conn.fetchval("SELECT count(*) FROM documents")) if exists else 0
        finally:
            await conn.close()

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        asyncio.run(wait_until(lambda: count_at_least(count, 40), within=90))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = asyncio.run(count())
    assert 0 < partial < n, "the kill should land mid-ingest"

    env["RAG_EMBED_WINDOW"] = "1024"  # the window does not change chunks or vectors, only speed
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["unchanged"] >= partial and summary["added"] == n - summary["unchanged"]
    assert summary["embeddings_computed"] == summary["added"]  # nothing embedded twice

    async def verify() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM documents") == n
            assert await conn.fetchval("SELECT count(*) FROM chunks") == n
            mismatched = await conn.fetchval(
                """SELECT count(*) FROM documents d
                   WHERE d.chunk_count <> (SELECT count(*) FROM chunks c WHERE c.document_id = d.id)"""
            )
            assert mismatched == 0
            ids = await conn.fetchval("SELECT count(DISTINCT external_id) FROM documents")
            assert ids == n
        finally:
            await conn.close()

    asyncio.run(verify())


async def count_at_least(count: Callable[[], Awaitable[int]], minimum: int) -> bool:
    return await count() >= minimum
