"""On an idle worker a miss's retrieval does not wait for its semantic-cache look-up: both need only
the question's vector, so they run side by side (one Postgres round trip off the miss path).

Made visible without timing: two other connections lock `semantic_cache` and `chunks`; both of the
miss's queries must then be seen waiting on those locks at the same time. When the steps ran one
after the other, the search never started while the semantic look-up was blocked.
"""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from service.embeddings.encoders import LocalEmbedder
from service.http.app import create_app
from service.settings import Settings
from tests.support.answers import ask, seed
from tests.support.servers import bearer, make_key, serve_app, wait_until

WAITING = """
SELECT count(DISTINCT c.relname) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
WHERE NOT l.granted AND c.relname IN ('semantic_cache', 'chunks')
"""


async def test_retrieval_runs_beside_the_semantic_lookup_on_an_idle_worker(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    settings = settings.model_copy(update={"db_statement_timeout_s": 0, "db_command_timeout_s": 0})
    await seed(settings, local_embedder)
    key = await make_key(settings, "query")
    async with (
        serve_app(create_app(settings, embedder=local_embedder)) as url,
        httpx.AsyncClient(base_url=url, timeout=60, headers=bearer(key)) as http,
    ):
        assert (await ask(http, "Which library parses PDF files?")).status == 200  # the key is now known
        lockers = [await asyncpg.connect(settings.database_url) for _ in range(2)]
        watcher = await asyncpg.connect(settings.database_url)
        try:
            for locker, table in zip(lockers, ("semantic_cache", "chunks"), strict=True):
                await locker.execute(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            asked = asyncio.create_task(ask(http, "How do I rotate the signing keys?"))

            async def both_waiting() -> bool:
                return int(await watcher.fetchval(WAITING)) == 2

            await wait_until(both_waiting, within=20)
        finally:
            for locker in lockers:
                await locker.close()  # the locks go with their connections
            await watcher.close()
        reply = await asked
        assert reply.status == 200 and reply.of("meta")[0]["cache"] == "miss"
