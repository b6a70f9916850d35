"""The FastAPI application: `create_app(settings)` and the lifespan that owns connections."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service import __version__
from service.corpus import database_url, schema_params
from service.db import create_pool, migrate
from service.embedded import EmbeddedValkey, start_valkey
from service.embeddings import LocalEmbedder, OpenAIEmbedder, create_embedder
from service.errors import install_error_handlers
from service.settings import Settings
from service.store import Store

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 2.0


@dataclass
class Resources:
    """Everything a request needs that outlives it; built by the lifespan, one per worker."""

    settings: Settings
    pool: asyncpg.Pool
    redis: aioredis.Redis
    store: Store
    embedder: LocalEmbedder | OpenAIEmbedder


def redis_url(settings: Settings) -> tuple[str, EmbeddedValkey | None]:
    if settings.redis_url:
        return settings.redis_url, None
    server = start_valkey(settings.data_dir)
    return server.url, server


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    dsn, pg_server = database_url(settings)
    rurl, valkey = redis_url(settings)
    embedder = create_embedder(settings)
    await migrate(dsn, schema_params(settings, embedder))
    pool = await create_pool(dsn, min_size=settings.db_pool_min, max_size=settings.db_pool_max)
    client = aioredis.from_url(rurl, socket_timeout=1.0, socket_connect_timeout=1.0)
    await embedder.warm_up()
    app.state.resources = Resources(settings, pool, client, Store(pool), embedder)
    try:
        yield
    finally:
        await client.aclose()
        await pool.close()
        if valkey is not None:
            valkey.stop()
        if pg_server is not None:
            pg_server.stop()


async def _check(name: str, probe: Any) -> tuple[str, dict[str, Any]]:
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(probe, READY_TIMEOUT_S)
    except Exception as exc:  # readiness reports any failure, it never raises
        return name, {"ok": False, "error": type(exc).__name__}
    result = {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
    if isinstance(detail, dict):
        result.update(detail)
    return name, result


async def _postgres_probe(pool: asyncpg.Pool) -> dict[str, Any]:
    documents = await pool.fetchval("SELECT count(*) FROM documents")
    return {"documents": documents}


async def _redis_probe(client: aioredis.Redis) -> None:
    await client.ping()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="ragcache", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers. Dependencies are /ready's business."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    async def ready(request: Request) -> JSONResponse:
        """Postgres is required (no retrieval without it); Redis only degrades (no cache)."""
        res: Resources = request.app.state.resources
        checks = dict(
            await asyncio.gather(
                _check("postgres", _postgres_probe(res.pool)),
                _check("redis", _redis_probe(res.redis)),
            )
        )
        checks["embedder"] = {"ok": True, "model": res.embedder.model, "dim": res.embedder.dim}
        if not checks["postgres"]["ok"]:
            return JSONResponse({"status": "unavailable", "checks": checks}, 503, headers={"Retry-After": "5"})
        status = "ready" if checks["redis"]["ok"] else "degraded"
        return JSONResponse({"status": status, "checks": checks})

    return app


def app_factory() -> FastAPI:
    """Entry point for uvicorn workers (`--factory`): settings come from the environment."""
    return create_app(Settings())
