"""The FastAPI application: `create_app(settings)` and the lifespan that owns connections."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service import __version__
from service.answer.admission import AdmissionGate
from service.answer.coalescing import Coalescer
from service.answer.generation import Models, Timeouts
from service.answer.observe import provider_attempts
from service.answer.pipeline import AnswerService
from service.answer.question import QuestionReader
from service.embeddings.encoders import AnyEmbedder, create_embedder
from service.embeddings.memory import release_free_memory
from service.hashing import hash_key
from service.http.auth import KEYS_CHANNEL, Authenticator, KeyStore
from service.http.dashboard import router as dashboard_router
from service.http.docs import install_docs
from service.http.errors import install_error_handlers
from service.http.middleware import AccessLog, BodySizeLimit, RequestID
from service.http.openai_api import router as openai_router
from service.http.rag import router as rag_router
from service.http.responses import ErrorResponse
from service.observability.logs import configure_logging
from service.observability.metrics import Metrics
from service.observability.prometheus import PrometheusMetrics
from service.observability.tracing import Tracing
from service.policy.routing import RoutingPolicy
from service.postgres.corpus import database_url, schema_params
from service.postgres.db import create_pool, migrate
from service.postgres.documents import DocumentStore
from service.postgres.notifications import NotificationRelay
from service.postgres.retrieval import RetrievalConfig, Retriever
from service.postgres.semantic_index import SemanticCache
from service.postgres.watcher import CorpusWatcher
from service.providers.base import Provider
from service.providers.extractive import ExtractiveProvider
from service.redis.answer_cache import AnswerCache
from service.redis.client import WorkerRedis, redis_url
from service.redis.limits import Limiter
from service.redis.rewrites import RewriteCache
from service.settings import Settings

if TYPE_CHECKING:
    from service.observability.tracing import TracerProvider

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 2.0
NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "Postgres is unreachable; the body also carries `status` and per-dependency `checks`.",
        "model": ErrorResponse,
    }
}


@dataclass
class Resources:
    """Everything a request needs that outlives it; built by the lifespan, one per worker."""

    settings: Settings
    pool: asyncpg.Pool
    store: DocumentStore
    embedder: AnyEmbedder
    cache: AnswerCache
    watcher: CorpusWatcher
    answers: AnswerService
    metrics: Metrics
    auth: Authenticator
    limiter: Limiter
    pools: WorkerRedis

    @property
    def redis(self) -> aioredis.Redis:
        """The request pool's client: the one every request path uses."""
        return self.pools.requests


def build_providers(settings: Settings) -> dict[str, Provider]:
    """Every configured provider; the offline extractive generator is always there."""
    providers: dict[str, Provider] = {"extractive": ExtractiveProvider()}
    retries, connect, read = settings.provider_max_retries, settings.connect_timeout_s, settings.first_token_timeout_s
    # A provider's code is imported only when it is configured: the `openai` SDK adds ~15 MB to a
    # worker's RSS; Anthropic is called over httpx, without its SDK's ~43 MB (docs/benchmarks.md,
    # "API worker memory").
    if settings.anthropic_api_key:
        from service.providers.anthropic import AnthropicProvider

        providers["anthropic"] = AnthropicProvider(
            api_key=settings.anthropic_api_key.get_secret_value(),
            base_url=settings.anthropic_base_url,
            max_retries=retries,
            connect_timeout=connect,
            read_timeout=read,
        )
    if settings.openai_api_key or settings.openai_base_url:
        from service.providers.openai import OpenAIProvider

        providers["openai"] = OpenAIProvider(
            api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
            base_url=settings.openai_base_url,
            max_retries=retries,
            connect_timeout=connect,
            read_timeout=read,
        )
    return providers


def routing_policy(settings: Settings) -> RoutingPolicy:
    return RoutingPolicy.from_config(
        anthropic=settings.anthropic_api_key is not None,
        openai=settings.openai_api_key is not None,
        openai_compatible=settings.openai_base_url is not None,
        models_small=settings.models_small,
        models_large=settings.models_large,
        large_prompt_tokens=settings.route_large_prompt_tokens,
        large_max_tokens=settings.route_large_max_tokens,
        large_feature_score=settings.route_large_feature_score,
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    dsn, pg_server = database_url(settings)
    rurl, valkey = redis_url(settings)
    embedder = app.state.embedder or create_embedder(settings)
    await migrate(dsn, schema_params(settings, embedder))
    pool = await create_pool(
        dsn,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        ef_search=settings.hnsw_ef_search,
        max_scan_tuples=settings.hnsw_max_scan_tuples,
        statement_timeout_s=settings.db_statement_timeout_s,
        command_timeout_s=settings.db_command_timeout_s,
        acquire_timeout_s=settings.db_acquire_timeout_s,
    )
    pools = WorkerRedis.open(rurl, settings)
    client = pools.requests
    await embedder.warm_up()
    cache = AnswerCache(client, ttl_s=settings.cache_ttl_s)
    metrics = Metrics(
        client,
        prometheus=app.state.prometheus,
        retention_s=settings.metrics_retention_s,
        collections=settings.metrics_collection_names(),
    )
    metrics.start()
    auth = Authenticator(KeyStore(pool).get, ttl_s=settings.auth_cache_ttl_s)
    relay = NotificationRelay(dsn)  # one LISTEN connection: corpus changes and revoked keys
    relay.subscribe(KEYS_CHANNEL, auth.forget)
    watcher = CorpusWatcher(pool, cache, relay)
    await relay.start()
    await watcher.start()
    providers = build_providers(settings)
    tracing: Tracing = app.state.tracing
    policy = routing_policy(settings)
    attempts = provider_attempts(metrics)  # each candidate model's outcome before its first token, counted
    answers = AnswerService(
        settings=settings,
        embedder=embedder,
        retriever=Retriever(pool, config=RetrievalConfig.of(settings)),
        cache=cache,
        semantic=SemanticCache(pool, threshold=settings.semantic_cache_threshold, ttl_s=settings.cache_ttl_s)
        if settings.semantic_cache
        else None,
        coalescer=Coalescer(
            client, followers=pools.followers, publisher=pools.publish, lease_ms=settings.coalesce_lease_ms
        ),
        watcher=watcher,
        models=Models(providers, Timeouts(settings.first_token_timeout_s, settings.total_timeout_s), attempts),
        policy=policy,
        questions=QuestionReader.of(
            settings,
            providers=providers,
            policy=policy,
            hash_key=hash_key(settings),
            rewrites=RewriteCache(client, ttl_s=settings.cache_ttl_s),
        ),
        metrics=metrics,
        admission=AdmissionGate(
            settings.admission_slots,
            queue=settings.admission_queue,
            wait_s=settings.admission_wait_s,
            on_wait=metrics.prometheus.admission_wait.observe,
        ),
    )
    # The model and SDKs leave ~650k long-lived objects; full GC passes over them took 0.3-0.7 s
    # and were the p99 of cache hits. Freeze them out of the collector's view.
    gc.collect()
    gc.freeze()
    release_free_memory()  # what loading the model and the SDKs freed goes back to the system
    app.state.resources = Resources(
        settings,
        pool,
        DocumentStore(pool),
        embedder,
        cache,
        watcher,
        answers,
        metrics,
        auth,
        Limiter(
            pools.limits,
            auth_failures_per_minute=settings.auth_failures_per_minute,
            inflight_lapse_s=settings.total_timeout_s + 30,
        ),
        pools,
    )
    try:
        yield
    finally:
        await watcher.stop()
        await relay.stop()
        for provider in providers.values():
            close = getattr(provider, "aclose", None)
            if close is not None:
                await close()
        await metrics.aclose()
        await asyncio.to_thread(tracing.shutdown)  # flushes the spans still batched
        await pools.aclose()
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


async def _redis_probe(pools: WorkerRedis) -> dict[str, Any] | None:
    """PING through the limits pool; when all its connections are taken (a busy worker, not a
    degraded one), through the followers' pool instead, and say the limits pool is busy."""
    if pools.limits_busy:
        await pools.followers.ping()
        return {"busy": True}
    await pools.limits.ping()
    return None


def create_app(
    settings: Settings | None = None,
    *,
    embedder: AnyEmbedder | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """Build the app; `embedder` lets a caller share an already loaded model (tests, benchmarks).

    `tracer_provider` (an OpenTelemetry TracerProvider) traces answers into it instead of what
    the settings configure (RAG_OTEL_ENABLED / OTEL_EXPORTER_OTLP_ENDPOINT); its owner shuts it down.
    """
    settings = settings or Settings()
    tracing = Tracing.from_settings(settings, tracer_provider)
    app = FastAPI(
        title="ragcache",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # service/http/docs.py serves /docs without a CDN, when RAG_DOCS is on
        redoc_url=None,
        **tracing.fastapi_options(),
    )
    app.state.settings = settings
    app.state.embedder = embedder
    app.state.tracing = tracing
    app.state.prometheus = PrometheusMetrics()  # this app's metric objects, in a registry of its own
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AccessLog)  # outside the size limit: a 413 gets its access line too
    app.add_middleware(RequestID)  # outermost: even a 413 carries the id
    app.include_router(rag_router)
    app.include_router(dashboard_router)
    app.include_router(openai_router)
    if settings.docs:
        install_docs(app)

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers. Dependencies are /ready's business."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses=NOT_READY)
    async def ready(request: Request) -> JSONResponse:
        """Postgres is required (no retrieval without it); Redis only degrades (no cache).

        Redis is probed through the limits pool, the one a busy request pool cannot starve, so a
        worker under load does not call itself degraded.
        """
        res: Resources = request.app.state.resources
        checks = dict(
            await asyncio.gather(
                _check("postgres", _postgres_probe(res.pool)),
                _check("redis", _redis_probe(res.pools)),
            )
        )
        checks["embedder"] = {"ok": True, "model": res.embedder.model, "dim": res.embedder.dim}
        # Limits live in Redis and fail open without it: say so rather than pretend.
        checks["limits"] = {"ok": checks["redis"]["ok"], "mode": "enforced" if checks["redis"]["ok"] else "fail_open"}
        if not checks["postgres"]["ok"]:
            # The error object too, so every non-2xx answer here has the same shape as the others.
            error = {"code": "database_unavailable", "message": "postgres is not reachable"}
            return JSONResponse(
                {"status": "unavailable", "checks": checks, "error": error}, 503, headers={"Retry-After": "5"}
            )
        status = "ready" if checks["redis"]["ok"] else "degraded"
        return JSONResponse({"status": status, "checks": checks})

    return app


def app_factory() -> FastAPI:
    """Entry point for uvicorn workers (`--factory`): settings come from the environment."""
    settings = Settings()
    configure_logging(settings.log_level, json=settings.log_format == "json")
    return create_app(settings)
