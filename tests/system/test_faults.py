"""Faults that really happen: servers killed mid-load, providers misbehaving, an ingest SIGKILLed.

Every test that kills a server starts its own (never the session-wide ones) in its own
temp dir. Nothing here sleeps to synchronise: conditions are polled with `wait_until`.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from ingest.loaders import SourceDocument, discover, load
from ingest.pipeline import IngestOptions, ingest_documents
from service.embedded import start_postgres, start_valkey
from service.embeddings.encoders import LocalEmbedder
from service.http.app import Resources, create_app
from service.postgres.corpus import open_corpus
from service.settings import Settings
from tests.support.answers import FLUSH, Reply, ask, running, seed, with_providers
from tests.support.provider_server import Behavior, ProviderServer
from tests.support.servers import BIN, bearer, cli_env, make_key, make_settings, serve_app, wait_until

KEYS_QUESTION = "How are API keys stored?"
PDF_QUESTION = "How are PDF files parsed?"
CHANGED_CACHE_DOC = SourceDocument(
    "handbook",
    "cache.md",
    "mem://cache.md",
    "Caching",
    "To flush the answer cache, run rag-admin cache flush --yes. It asks for confirmation first.",
)


@pytest.fixture
def own_dir() -> Iterator[Path]:
    """A data dir for servers this test kills, outside pytest's basetemp: a concurrent pytest run
    prunes old basetemp dirs, which would pull the data from under a live server (see conftest)."""
    path = Path(tempfile.mkdtemp(prefix="ragcache-test-faults-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    with ProviderServer() as server:
        yield server


@asynccontextmanager
async def serving(
    settings: Settings, embedder: LocalEmbedder, key: str
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """Like `running`, but also hands out the app, so a test can look at its resources."""
    app = create_app(settings, embedder=embedder)
    async with (
        serve_app(app) as url,
        httpx.AsyncClient(base_url=url, timeout=30, headers=bearer(key)) as http,
    ):
        yield app, http


def resources(app: FastAPI) -> Resources:
    res: Resources = app.state.resources
    return res


def complete(reply: Reply) -> bool:
    """A 200 stream of meta, token…, done: nothing missing, no error event."""
    names = reply.names
    return (
        reply.status == 200
        and len(names) >= 2
        and names[0] == "meta"
        and names[-1] == "done"
        and set(names[1:-1]) <= {"token"}
    )


# --- Redis ---------------------------------------------------------------------------------


async def test_redis_killed_under_load_fails_open_and_the_cache_comes_back(
    database_url: str, tmp_path: Path, own_dir: Path, local_embedder: LocalEmbedder
) -> None:
    """Hits turn into misses while Redis is gone, nobody sees a 5xx, and no restart is needed after."""
    valkey = start_valkey(own_dir)
    try:
        settings = make_settings(database_url, valkey.url, tmp_path)
        await seed(settings, local_embedder)
        repeated = [FLUSH, KEYS_QUESTION, PDF_QUESTION]
        async with running(settings, local_embedder) as http:
            for question in repeated:
                assert (await ask(http, question)).meta["cache"] == "miss"
                assert (await ask(http, question)).meta["cache"] == "hit"
            ready = (await http.get("/ready")).json()
            assert ready["status"] == "ready" and ready["checks"]["limits"]["mode"] == "enforced"

            total, kill_after = 60, 20
            finished: list[tuple[bool, str, Reply]] = []  # (started after the kill, question, reply)
            at_kill: list[int] = []
            killed = asyncio.Event()
            gate = asyncio.Semaphore(8)

            async def one(i: int) -> None:
                # Half repeat the warm questions (hits until Redis dies); half are new (misses).
                question = repeated[i % 3] if i % 2 == 0 else f"What does part {i} of the handbook say about PDF files?"
                async with gate:
                    after_kill = killed.is_set()
                    reply = await ask(http, question)
                finished.append((after_kill, question, reply))

            async def killer() -> None:
                await wait_until(lambda: len(finished) >= kill_after, within=60, interval=0.005)
                valkey.kill()
                killed.set()
                at_kill.append(len(finished))
                # While Redis is down (the load still running), readiness says so.
                body = (await http.get("/ready")).json()
                assert body["status"] == "degraded", body
                assert body["checks"]["redis"]["ok"] is False
                assert body["checks"]["limits"] == {"ok": False, "mode": "fail_open"}

            await asyncio.gather(killer(), *(one(i) for i in range(total)))

            assert len(finished) == total
            broken = [(q, r.status, r.names, r.body) for _, q, r in finished if not complete(r)]
            assert not broken, broken
            before = [r for after, q, r in finished[:kill_after] if q in repeated]
            assert before and all(r.meta["cache"] == "hit" for r in before), "warm questions should hit before"
            after = [(q, r) for was_after, q, r in finished if was_after]
            assert len(after) >= total - at_kill[0] - 8 >= 10  # all but those in flight at the kill
            assert all(r.meta["cache"] == "miss" for _, r in after), "no hit can come from a dead Redis"
            assert any(q in repeated for q, _ in after), "a warm question was asked while Redis was down"
            assert (await ask(http, FLUSH)).status == 200

            # Same socket, same data dir: the running app reconnects by itself.
            valkey = start_valkey(own_dir)

            async def ready_again() -> bool:
                return bool((await http.get("/ready")).json()["status"] == "ready")

            await wait_until(ready_again, within=20, interval=0.1)

            fresh = "Which command flushes every cached answer at once?"

            async def hit_again() -> bool:
                reply = await ask(http, fresh)
                assert complete(reply), reply.body
                return bool(reply.meta["cache"] == "hit")

            await wait_until(hit_again, within=30, interval=0.2)
            assert (await ask(http, FLUSH)).status == 200
            ready = (await http.get("/ready")).json()
            assert ready["checks"]["limits"]["mode"] == "enforced"
    finally:
        valkey.stop()


# --- Postgres ----------------------------------------------------------------------------------


async def test_postgres_killed_hits_still_served_misses_503_and_recovery(
    redis_url: str, tmp_path: Path, own_dir: Path, local_embedder: LocalEmbedder
) -> None:
    """Cache-first: hits (and the keys that ask for them) need no database; misses get a clean 503."""
    pg = start_postgres(own_dir)
    try:
        # A zero auth-cache TTL: every request asks Postgres about its key, so while Postgres is
        # down the only way a known key still works is the stale entry the authenticator keeps.
        settings = make_settings(pg.url, redis_url, tmp_path, auth_cache_ttl_s=0)
        await seed(settings, local_embedder)
        known = await make_key(settings, "query")
        never_seen = await make_key(settings, "query")
        async with running(settings, local_embedder, key=known) as http:
            first = await ask(http)
            assert first.meta["cache"] == "miss"
            answer = await http.post("/rag/answer", json={"question": PDF_QUESTION})
            assert answer.status_code == 200 and answer.json()["cache"] == "miss"

            pg.kill()

            for _ in range(3):  # repeatedly: each one re-asks Postgres for the key and falls back
                hit = await ask(http)
                assert complete(hit) and hit.meta["cache"] == "hit" and hit.text == first.text
            answer = await http.post("/rag/answer", json={"question": PDF_QUESTION})
            assert answer.status_code == 200 and answer.json()["cache"] == "hit"

            miss = await ask(http, KEYS_QUESTION)
            assert miss.status == 503 and miss.body["error"]["code"] == "database_unavailable"
            assert int(miss.headers["retry-after"]) > 0

            stranger = await ask(http, headers=bearer(never_seen))
            assert stranger.status == 503, "a key that cannot be checked is not a wrong key"
            assert stranger.body["error"]["code"] == "auth_unavailable" and int(stranger.headers["retry-after"]) > 0

            ready = await http.get("/ready")
            assert ready.status_code == 503 and ready.json()["checks"]["postgres"]["ok"] is False
            assert ready.headers["retry-after"]

            pg.restart()

            async def recovered() -> bool:
                return (await ask(http, KEYS_QUESTION)).status == 200

            await wait_until(recovered, within=30, interval=0.2)
            again = await ask(http, headers=bearer(never_seen))
            assert complete(again) and again.meta["cache"] == "hit"
            assert (await http.get("/ready")).json()["status"] == "ready"

            # Cache invalidation came back too: a change to the cited document drops its cached answer.
            await seed(settings, local_embedder, [CHANGED_CACHE_DOC])

            async def invalidated() -> bool:
                reply = await ask(http)
                return reply.meta["cache"] == "miss" and "--yes" in reply.text

            await wait_until(invalidated, within=20, interval=0.2)
    finally:
        pg.stop()


# --- providers, through the real SDKs ----------------------------------------------------------


async def summary(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/dashboard/api/summary?range=1h")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def redis_in_use(res: Resources) -> int:
    counts = res.redis.connection_pool.get_connection_count()
    return sum(n for n, attributes in counts if "used" in {str(v) for v in attributes.values()})


async def test_provider_faults_then_nothing_leaks(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    settings = with_providers(settings, provider, provider_max_retries=2, first_token_timeout_s=0.6)
    await seed(settings, local_embedder)
    admin = await make_key(settings, "admin")  # the dashboard's numbers are part of what is checked
    async with serving(settings, local_embedder, admin) as (app, http):
        res = resources(app)
        warm = await ask(http, "What is the time to live of cached answers?")
        assert complete(warm)
        await wait_until(lambda: not res.answers._background)
        baseline_tasks = len(asyncio.all_tasks())

        # 1. A burst of 429 and 529, then success: the SDK's retries absorb it, invisibly.
        provider.enqueue(Behavior(status=429, retry_after=0.01), Behavior(status=529, retry_after=0.01))
        burst = await ask(http)
        assert complete(burst) and burst.meta["cache"] == "miss"
        route = burst.meta["route"]
        assert (route["provider"], route["model"], route["tier"]) == ("anthropic", "claude-haiku-4-5", "small")
        assert "fell back" not in route["reason"]
        assert [c.status for c in provider.calls_to("messages")[-3:]] == [429, 529, 200]

        async def counted(outcome: str, n: int) -> bool:
            return bool((await summary(http))["requests"]["by_outcome"][outcome] >= n)

        await wait_until(lambda: counted("miss", 2))
        numbers = await summary(http)
        assert numbers["requests"]["by_outcome"]["miss"] == 2 and numbers["failures"] == []
        attempts = numbers["provider"]["attempts"]
        assert attempts["ok"] == 2 and attempts["error"] == 0 and attempts["timeout"] == 0
        assert numbers["provider"]["by_status"] == {}
        assert (await ask(http)).meta["cache"] == "hit"  # the retried answer was complete: cached

        # 2. 5xx on every attempt of the first provider: fall back to the second.
        calls_before = len(provider.calls_to("messages"))
        provider.enqueue(*(Behavior(status=500, retry_after=0.01) for _ in range(3)), route="messages")
        fallback = await ask(http, KEYS_QUESTION)
        assert complete(fallback)
        route = fallback.meta["route"]
        assert (route["provider"], route["model"]) == ("openai", "gpt-4o-mini")
        assert "fell back" in route["reason"] and "500" in route["reason"]
        assert [c.status for c in provider.calls_to("messages")[calls_before:]] == [500, 500, 500]
        assert provider.calls_to("chat.completions")[-1].status == 200

        # 3a. Hanging before the first token: abandoned at the first-token timeout, next candidate answers.
        provider.enqueue(Behavior(hang=True), route="messages")
        slow = await ask(http, PDF_QUESTION)
        assert complete(slow) and slow.meta["route"]["provider"] == "openai"
        assert "no first token in time" in slow.meta["route"]["reason"]
        hung = [c for c in provider.calls_to("messages") if c.behavior.hang]
        assert await provider.async_wait_for(lambda: all(c.disconnected for c in hung), timeout=5)

        # 3b. Every candidate hangs: a clean 503 JSON error, before any stream exists.
        provider.default = Behavior(hang=True)
        stuck = await ask(http, "Who may revoke an API key?")
        assert stuck.status == 503 and stuck.headers["retry-after"]
        assert stuck.body["error"]["code"] == "providers_unavailable"
        assert "no first token in time" in stuck.body["error"]["message"]
        provider.default = Behavior()
        hung = [c for c in provider.calls if c.behavior.hang]
        assert len(hung) >= 5  # 3a's, and each of the four candidates of 3b
        assert await provider.async_wait_for(lambda: all(c.disconnected for c in hung), timeout=5)

        # 4. The connection drops mid-stream: an SSE error event, and nothing is cached.
        dropped_question = "Are scanned PDFs rejected?"
        provider.enqueue(Behavior(text="one two three four five six", drop_after=3), route="messages")
        broken = await ask(http, dropped_question)
        assert broken.status == 200 and broken.names[0] == "meta" and broken.names[-1] == "error"
        assert "done" not in broken.names and broken.text == "one two three "
        assert broken.of("error")[0]["code"] == "generation_failed"
        calls_before = len(provider.calls)
        again = await ask(http, dropped_question)
        assert complete(again) and again.meta["cache"] == "miss"
        assert len(provider.calls) == calls_before + 1, "the next identical request calls the provider again"
        assert (await ask(http, dropped_question)).meta["cache"] == "hit"

        # Counted right: one error per failed candidate attempt, one stream failure, one 503.
        await wait_until(lambda: counted("miss", 5))  # warm, burst, fallback, slow, again
        numbers = await summary(http)
        assert numbers["requests"]["by_outcome"]["miss"] == 5
        failures = {(f["stage"], f["code"]): f["count"] for f in numbers["failures"]}
        assert failures == {("stream", "generation_failed"): 1, ("provider", "providers_unavailable"): 1}, failures
        # The SDK's retries are invisible: one error per abandoned candidate (the 500s, the hangs).
        assert numbers["provider"]["by_status"] == {"500": 1, "timeout": 5}
        assert numbers["provider"]["attempts"]["ok"] == 6  # warm, burst, fallback, slow, broken, again

        # Nothing leaked: background work done, no connection held, no task left behind.
        await wait_until(lambda: not res.answers._background)
        await wait_until(lambda: res.pool.get_idle_size() == res.pool.get_size())
        await wait_until(lambda: redis_in_use(res) == 0)
        await wait_until(lambda: len(asyncio.all_tasks()) <= baseline_tasks)
        assert all(c.done for c in provider.calls), "the provider is still working on a request"
    # The app closed its SDK clients: every connection to the provider is gone.
    await wait_until(lambda: provider.open_connections == 0)


# --- ingest killed while the API answers --------------------------------------------------------

CHUNKING = {"RAG_CHUNK_TOKENS": "32", "RAG_CHUNK_OVERLAP": "8"}
OPTIONS = IngestOptions(chunk_tokens=32, chunk_overlap=8, window=1024)  # what CHUNKING makes the CLI use
COLORS = ["red", "green", "blue", "amber", "violet", "silver"]
WIDGETS = [
    "aurora",
    "basalt",
    "cobalt",
    "dynamo",
    "ember",
    "fjord",
    "glacier",
    "harbor",
    "indigo",
    "jasper",
    "kestrel",
    "lumen",
    "magnet",
    "nebula",
    "onyx",
    "prism",
    "quartz",
    "raven",
    "sierra",
    "tundra",
    "umber",
    "vortex",
    "willow",
    "zenith",
]
DOCS_N = len(WIDGETS)


def widget_text(i: int, edition: str) -> str:
    """Every sentence names the edition, so every chunk (and every snippet) shows its version;
    and the widget's unusual name, so a question about it retrieves several of its chunks."""
    name = WIDGETS[i]
    sentences = [
        f"The {name} widget in edition {edition} has a {COLORS[i % 6]} housing made of {edition.lower()} alloy.",
        f"The edition {edition} {name} widget weighs {i + 3} grams and runs on {i % 4 + 1} cells.",
        f"Edition {edition} of the {name} widget ships with manual page {i * 3} for setup.",
        f"To reset the {name} widget edition {edition}, hold its button for {i % 9 + 2} seconds.",
        f"The {name} widget edition {edition} is serviced every {i % 5 + 1} months by a technician.",
    ]
    return "\n\n".join(sentences)


def widget_question(i: int) -> str:
    return f"Tell me about the {WIDGETS[i]} widget."


def write_corpus(path: Path, edition: str) -> None:
    with path.open("w") as fh:
        for i in range(DOCS_N):
            fh.write(
                json.dumps({"id": f"w{i}", "title": f"The {WIDGETS[i]} widget", "text": widget_text(i, edition)}) + "\n"
            )


def load_corpus(path: Path) -> list[SourceDocument]:
    """What `rag-ingest add PATH --source kb` reads from the file."""
    entries, failures = discover([str(path)], source="kb")
    assert not failures
    return [d for e in entries for d in load(e) if isinstance(d, SourceDocument)]


def edition_of(snippet: str) -> str:
    found = {e for e in ("ALPHA", "BRAVO") if f"edition {e}" in snippet or f"Edition {e}" in snippet}
    assert len(found) == 1, f"a snippet without exactly one edition marker: {snippet!r}"
    return found.pop()


async def editions_in_db(dsn: str) -> dict[str, set[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT d.external_id, c.text, d.chunk_count,
                      (SELECT count(*) FROM chunks x WHERE x.document_id = d.id) AS stored
               FROM documents d JOIN chunks c ON c.document_id = d.id"""
        )
    finally:
        await conn.close()
    assert all(r["chunk_count"] == r["stored"] for r in rows), "a document with missing chunks"
    found: dict[str, set[str]] = {}
    for r in rows:
        found.setdefault(r["external_id"], set()).add(edition_of(" ".join(r["text"].split())))
    return found


async def test_ingest_sigkilled_while_serving_never_mixes_versions(
    settings: Settings, local_embedder: LocalEmbedder, tmp_path: Path
) -> None:
    folder = tmp_path / "kb"
    folder.mkdir()
    corpus_file = folder / "widgets.jsonl"
    write_corpus(corpus_file, "ALPHA")
    async with open_corpus(settings) as corpus:
        report = await ingest_documents(corpus.store, local_embedder, load_corpus(corpus_file), OPTIONS)
        assert report.added == DOCS_N and report.chunks >= 2 * DOCS_N  # several chunks per widget
        seeded_generation = await corpus.store.corpus_version()
    write_corpus(corpus_file, "BRAVO")  # the same ids, new text

    cmd = [str(BIN / "rag-ingest"), "add", str(corpus_file), "--source", "kb", "--json"]
    env = cli_env(settings, RAG_EMBED_WINDOW="1", **CHUNKING)
    replies: list[Reply] = []
    stop = asyncio.Event()

    async with running(settings, local_embedder) as http:

        async def asker(seed_: int) -> None:
            rng = random.Random(seed_)
            while not stop.is_set():
                i = rng.randrange(DOCS_N)
                cache = "use" if rng.random() < 0.3 else "bypass"
                replies.append(await ask(http, widget_question(i), top_k=6, cache=cache))

        askers = [asyncio.create_task(asker(n)) for n in range(2)]
        try:
            killed = await asyncio.create_subprocess_exec(
                *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )

            watch = await asyncpg.connect(settings.database_url)

            async def written() -> bool:  # the CLI committed its first batch of new versions
                return int(await watch.fetchval("SELECT generation FROM corpus")) > seeded_generation

            try:
                await wait_until(written, within=90, interval=0.01)
            finally:
                killed.send_signal(signal.SIGKILL)
                await killed.communicate()
                await watch.close()
            assert killed.returncode == -signal.SIGKILL
            served_during_kill = len(replies)

            at_kill = await editions_in_db(str(settings.database_url))
            assert all(len(v) == 1 for v in at_kill.values()), "a document holds chunks of two versions"
            new = [k for k, v in at_kill.items() if v == {"BRAVO"}]
            assert 0 < len(new) < DOCS_N, f"the kill should land mid-ingest ({len(new)} of {DOCS_N} rewritten)"

            # The rerun (in-process: the same pipeline as the CLI, without loading the model again)
            # skips what the killed run committed and writes the rest in small batches, each its
            # own transaction, while the askers keep asking.
            async with open_corpus(settings) as corpus:
                small_batches = IngestOptions(OPTIONS.chunk_tokens, OPTIONS.chunk_overlap, window=8)
                rerun = await ingest_documents(corpus.store, local_embedder, load_corpus(corpus_file), small_batches)
            assert rerun.ok and (rerun.unchanged, rerun.updated) == (len(new), DOCS_N - len(new))
            assert rerun.embeddings_computed == rerun.chunks  # nothing the killed run wrote is embedded again
            assert set().union(*(await editions_in_db(str(settings.database_url))).values()) == {"BRAVO"}

            # A widget that was still old when the ingest died: its new version is served now,
            # fresh and (once the watcher dropped the old cached answers) from the cache too.
            old = next(int(k[1:]) for k, v in at_kill.items() if v == {"ALPHA"})
            question = widget_question(old)
            fresh = await ask(http, question, top_k=6, cache="bypass")
            assert complete(fresh) and {edition_of(s["snippet"]) for s in fresh.meta["sources"]} == {"BRAVO"}

            async def cached_is_new() -> bool:
                reply = await ask(http, question, top_k=6)
                return {edition_of(s["snippet"]) for s in reply.meta["sources"]} == {"BRAVO"}

            await wait_until(cached_is_new, within=20, interval=0.1)
        finally:
            stop.set()
            await asyncio.gather(*askers)

    assert served_during_kill > 0 and len(replies) > served_during_kill
    broken = [(r.status, r.names, r.body) for r in replies if not complete(r)]
    assert not broken, broken[:3]
    # Answers usually cite several chunks of the widget asked about, so a mix would show.
    several = [r for r in replies if max(Counter(s["document"] for s in r.meta["sources"]).values()) >= 2]
    assert len(several) > len(replies) // 2
    for reply in replies:
        by_document: dict[str, set[str]] = {}
        for source in reply.meta["sources"]:
            by_document.setdefault(source["document"], set()).add(edition_of(source["snippet"]))
        mixed = {doc: eds for doc, eds in by_document.items() if len(eds) > 1}
        assert not mixed, f"an answer mixed two versions of a document: {mixed}"
