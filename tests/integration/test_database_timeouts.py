"""A hung or locked Postgres costs a request seconds, never forever (issue 11): the server's
statement_timeout, asyncpg's command_timeout and a bounded pool acquire each end the request
with 503 `database_unavailable` and a Retry-After.

The database is made to hang deterministically: a table lock held by another connection
(retrieval blocks on it), or the pool's only connection held by the test.
"""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from service.embeddings.encoders import LocalEmbedder
from service.http.app import create_app
from service.settings import Settings
from tests.support.answers import ask, seed
from tests.support.servers import bearer, make_key, serve_app


def assert_database_unavailable(status: int, body: dict[str, dict[str, str]], retry_after: str | None) -> None:
    assert status == 503
    assert body["error"]["code"] == "database_unavailable"
    assert retry_after is not None and int(retry_after) >= 1


@pytest.mark.parametrize(
    "timeouts",
    [
        {"db_statement_timeout_s": 0.5, "db_command_timeout_s": 0},  # Postgres cancels the statement
        {"db_statement_timeout_s": 0, "db_command_timeout_s": 0.5},  # asyncpg stops waiting for it
    ],
    ids=["statement_timeout", "command_timeout"],
)
async def test_a_locked_table_yields_503_not_a_request_that_waits_forever(
    settings: Settings, local_embedder: LocalEmbedder, timeouts: dict[str, float]
) -> None:
    settings = settings.model_copy(update={"semantic_cache": False, **timeouts})
    await seed(settings, local_embedder)
    key = await make_key(settings, "query")
    async with (
        serve_app(create_app(settings, embedder=local_embedder)) as url,
        httpx.AsyncClient(base_url=url, timeout=60, headers=bearer(key)) as http,
    ):
        assert (await ask(http, "Which library parses PDF files?")).status == 200  # the key is now known
        locker = await asyncpg.connect(settings.database_url)
        try:
            async with locker.transaction():
                await locker.execute("LOCK TABLE chunks IN ACCESS EXCLUSIVE MODE")
                reply = await ask(http)
        finally:
            await locker.close()
        assert_database_unavailable(reply.status, reply.body, reply.headers.get("retry-after"))
        assert (await ask(http)).status == 200  # and the service recovers with the database


async def test_a_pool_held_by_others_yields_503_after_the_acquire_timeout(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    settings = settings.model_copy(update={"db_pool_min": 1, "db_pool_max": 1, "db_acquire_timeout_s": 0.5})
    await seed(settings, local_embedder)
    key = await make_key(settings, "query")
    app: FastAPI = create_app(settings, embedder=local_embedder)
    async with (
        serve_app(app) as url,
        httpx.AsyncClient(base_url=url, timeout=60, headers=bearer(key)) as http,
    ):
        assert (await ask(http, "Which library parses PDF files?")).status == 200  # the key is now known
        pool: asyncpg.Pool = app.state.resources.pool
        async with pool.acquire(timeout=10):  # the pool's one connection, held
            reply = await ask(http)
        assert_database_unavailable(reply.status, reply.body, reply.headers.get("retry-after"))
        assert (await ask(http)).status == 200
