"""All configuration in one place, read from the environment or `.env`.

Every setting is documented in README.md and `.env.example`; nothing else in the
code base reads the environment.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.policy.collections import valid_name
from service.policy.semantic_judge import DEFAULT_THRESHOLD

LOCAL_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    # --- where the data lives -------------------------------------------------
    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    redis_url: str | None = Field(default=None, alias="REDIS_URL")
    data_dir: Path = Field(default=Path(".ragcache"), alias="RAG_DATA_DIR")
    db_pool_min: int = Field(default=1, alias="RAG_DB_POOL_MIN", ge=0)
    db_pool_max: int = Field(default=10, alias="RAG_DB_POOL_MAX", ge=1)
    # A hung or locked Postgres must not hold a request forever: the server cancels a statement
    # after RAG_DB_STATEMENT_TIMEOUT_S (statement_timeout), asyncpg gives up on a reply after
    # RAG_DB_COMMAND_TIMEOUT_S, and a request waits at most RAG_DB_ACQUIRE_TIMEOUT_S for a pooled
    # connection. Each ends as 503 `database_unavailable` with Retry-After. 0 turns one off.
    db_statement_timeout_s: float = Field(default=5.0, alias="RAG_DB_STATEMENT_TIMEOUT_S", ge=0)
    db_command_timeout_s: float = Field(default=10.0, alias="RAG_DB_COMMAND_TIMEOUT_S", ge=0)
    db_acquire_timeout_s: float = Field(default=2.0, alias="RAG_DB_ACQUIRE_TIMEOUT_S", ge=0)

    # --- providers --------------------------------------------------------------
    anthropic_api_key: SecretStr | None = Field(default=None, alias="ANTHROPIC_API_KEY")
    anthropic_base_url: str | None = Field(default=None, alias="ANTHROPIC_BASE_URL")
    openai_api_key: SecretStr | None = Field(default=None, alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(default=None, alias="OPENAI_BASE_URL")

    # --- embeddings -------------------------------------------------------------
    embedding_provider: Literal["local", "openai"] = Field(default="local", alias="RAG_EMBEDDING_PROVIDER")
    embedding_model: str | None = Field(
        default=None,
        alias="RAG_EMBEDDING_MODEL",
        description="Default: all-MiniLM-L6-v2 (local) or text-embedding-3-small (openai).",
    )
    embedding_dim: int | None = Field(
        default=None,
        alias="RAG_EMBEDDING_DIM",
        description="Only needed for unknown OpenAI-compatible models.",
    )
    embed_batch_size: int = Field(default=64, alias="RAG_EMBED_BATCH_SIZE", ge=1, le=2048)
    # Texts handed to the embedder per call. The local model sorts each call's texts by length
    # before batching, so a wide window pads far less than batches cut in document order.
    embed_window: int = Field(default=1024, alias="RAG_EMBED_WINDOW", ge=1, le=65536)
    embed_concurrency: int = Field(default=4, alias="RAG_EMBED_CONCURRENCY", ge=1, le=64)
    # Runtime of the local model: onnx (ONNX Runtime; no torch in the process) or torch
    # (sentence-transformers). Both give the same vectors (cosine >= 0.99999), so a corpus
    # written by one is served by the other.
    embedding_runtime: Literal["onnx", "torch"] = Field(default="onnx", alias="RAG_EMBEDDING_RUNTIME")
    # Where the ONNX export of the local model is cached; unset: RAG_DATA_DIR/models.
    model_dir: Path | None = Field(default=None, alias="RAG_MODEL_DIR")
    # Micro-batching of concurrent embeddings in one process (onnx runtime): the first waiting
    # text waits at most this long for others to share its encode (a lone one, with no other call
    # in the window before it, does not wait), and one encode takes at most RAG_EMBED_MAX_BATCH
    # texts from waiting requests.
    embed_batch_window_ms: float = Field(default=2.0, alias="RAG_EMBED_BATCH_WINDOW_MS", ge=0, le=100)
    embed_max_batch: int = Field(default=32, alias="RAG_EMBED_MAX_BATCH", ge=1, le=1024)
    # CPU threads of the local model per process; unset: the runtime's default (one per core).
    # `rag-serve --workers N` sets it to cores / N so the workers do not fight over cores.
    torch_threads: int | None = Field(default=None, alias="RAG_TORCH_THREADS", ge=1, le=256)

    # --- chunking and retrieval -----------------------------------------------
    chunk_tokens: int = Field(default=400, alias="RAG_CHUNK_TOKENS", ge=32, le=8192)
    chunk_overlap: int = Field(default=50, alias="RAG_CHUNK_OVERLAP", ge=0)
    hnsw_m: int = Field(default=16, alias="RAG_HNSW_M", ge=2, le=100)
    hnsw_ef_construction: int = Field(default=64, alias="RAG_HNSW_EF_CONSTRUCTION", ge=4, le=1000)
    # 40 gives HNSW recall@10 >= 0.988 against exact search on msmarco-5k (docs/benchmarks.md);
    # much higher values make the planner prefer a sequential scan on small corpora.
    hnsw_ef_search: int = Field(default=40, alias="RAG_HNSW_EF_SEARCH", ge=1, le=1000)
    # How far a filtered vector search (a small collection) may walk the HNSW index before it
    # gives up; pgvector's default. Above the chunk count, a filter never shortens a top-k.
    hnsw_max_scan_tuples: int = Field(default=20_000, alias="RAG_HNSW_MAX_SCAN_TUPLES", ge=1)
    # dense (default) or hybrid (dense + full-text, fused). No fusion beat dense on both shared sets
    # (docs/benchmarks.md, measured with `rag-eval`), so hybrid is opt-in; measure it on your data.
    retrieval_mode: Literal["dense", "hybrid"] = Field(default="dense", alias="RAG_RETRIEVAL_MODE")
    hybrid_fusion: Literal["convex", "rrf"] = Field(default="convex", alias="RAG_HYBRID_FUSION")
    # The dense list's share of the fused score (convex) or of the RRF weights; full-text gets the rest.
    hybrid_dense_weight: float = Field(default=0.7, alias="RAG_HYBRID_DENSE_WEIGHT", ge=0, le=1)
    fulltext_rank: Literal["ts_rank", "ts_rank_cd"] = Field(default="ts_rank", alias="RAG_FULLTEXT_RANK")

    # --- cache ------------------------------------------------------------------
    cache_ttl_s: int = Field(default=7 * 24 * 3600, alias="RAG_CACHE_TTL_S", ge=1)
    redis_max_connections: int = Field(default=64, alias="RAG_REDIS_MAX_CONNECTIONS", ge=2)
    # Each worker's own pools for rate limits, budgets and in-flight slots, and for coalescing
    # followers' blocking reads, apart from the request pool above (service/redis/client.py).
    redis_limit_connections: int = Field(default=8, alias="RAG_REDIS_LIMIT_CONNECTIONS", ge=1)
    redis_follower_connections: int = Field(default=256, alias="RAG_REDIS_FOLLOWER_CONNECTIONS", ge=1)
    # Coalescing leaders' stream writes and lease renewals, apart from the request pool.
    redis_publish_connections: int = Field(default=32, alias="RAG_REDIS_PUBLISH_CONNECTIONS", ge=1)
    metrics_retention_s: int = Field(default=7 * 24 * 3600, alias="RAG_METRICS_RETENTION_S", ge=3600)
    coalesce_lease_ms: int = Field(default=5000, alias="RAG_COALESCE_LEASE_MS", ge=100)
    semantic_cache: bool = Field(default=True, alias="RAG_SEMANTIC_CACHE")
    # The semantic judge's score threshold (service/policy/semantic_judge.py): an estimated
    # probability that a cached question is a duplicate of the new one, after the hard vetoes.
    # Chosen for precision first on quora-pairs-dev (hand-reviewed) and bench/semantic_pairs.jsonl (docs/benchmarks.md).
    semantic_cache_threshold: float = Field(default=DEFAULT_THRESHOLD, alias="RAG_SEMANTIC_CACHE_THRESHOLD", gt=0, le=1)
    # Verification of semantic candidates by the small tier (service/answer/verification.py): off, or
    # small (with a language model configured; otherwise off, said once at startup). When on, every
    # candidate scoring at least RAG_SEMANTIC_VERIFY_FLOOR is served only on the model's "yes".
    semantic_verify: Literal["off", "small"] = Field(default="off", alias="RAG_SEMANTIC_VERIFY")
    semantic_verify_floor: float = Field(default=0.5, alias="RAG_SEMANTIC_VERIFY_FLOOR", gt=0, le=1)
    semantic_verify_timeout_s: float = Field(default=3.0, alias="RAG_SEMANTIC_VERIFY_TIMEOUT_S", gt=0)

    # --- routing ----------------------------------------------------------------
    models_small: str | None = Field(
        default=None, alias="RAG_MODELS_SMALL", description="Comma list; default per provider."
    )
    models_large: str | None = Field(default=None, alias="RAG_MODELS_LARGE")
    route_large_prompt_tokens: int = Field(default=3000, alias="RAG_ROUTE_LARGE_PROMPT_TOKENS", ge=1)
    route_large_max_tokens: int = Field(default=1024, alias="RAG_ROUTE_LARGE_MAX_TOKENS", ge=1)
    route_large_feature_score: int = Field(default=2, alias="RAG_ROUTE_LARGE_FEATURE_SCORE", ge=1)
    # USD per million tokens, input and output; models not listed cost 0 (local servers, extractive).
    pricing: dict[str, tuple[float, float]] = Field(
        default={
            "claude-haiku-4-5": (1.0, 5.0),
            "claude-sonnet-4-6": (3.0, 15.0),
            "gpt-4o-mini": (0.15, 0.60),
            "gpt-4o": (2.50, 10.0),
        },
        alias="RAG_PRICING",
    )

    # --- generation -----------------------------------------------------------
    context_token_budget: int = Field(default=4000, alias="RAG_CONTEXT_TOKEN_BUDGET", ge=100)
    provider_max_retries: int = Field(default=2, alias="RAG_PROVIDER_MAX_RETRIES", ge=0, le=10)
    connect_timeout_s: float = Field(default=5.0, alias="RAG_CONNECT_TIMEOUT_S", gt=0)
    first_token_timeout_s: float = Field(default=20.0, alias="RAG_FIRST_TOKEN_TIMEOUT_S", gt=0)
    total_timeout_s: float = Field(default=120.0, alias="RAG_TOTAL_TIMEOUT_S", gt=0)

    # --- conversations ------------------------------------------------------------
    # Bounds of the history a request may carry (`history` on /rag/*, earlier messages on /v1):
    # past them the request is refused with a 413 (history_too_long, history_too_many_tokens).
    history_max_turns: int = Field(default=20, alias="RAG_HISTORY_MAX_TURNS", ge=0, le=1000)
    history_max_tokens: int = Field(default=4000, alias="RAG_HISTORY_MAX_TOKENS", ge=0)
    # Tokens of recent turns the prompt's <conversation> block carries (newest kept first); only a
    # private answer (cache "bypass") sees the turns: a shared answer must not depend on a transcript.
    history_prompt_tokens: int = Field(default=1000, alias="RAG_HISTORY_PROMPT_TOKENS", ge=0)
    # How a follow-up becomes a standalone question: auto (the small tier when a provider is
    # configured, else the offline rules), offline (the rules only), off (no rewrite).
    rewrite: Literal["auto", "offline", "off"] = Field(default="auto", alias="RAG_REWRITE")
    rewrite_timeout_s: float = Field(default=3.0, alias="RAG_REWRITE_TIMEOUT_S", gt=0)
    # Previous user turns the rewrite reads (and its cache key covers).
    rewrite_turns: int = Field(default=3, alias="RAG_REWRITE_TURNS", ge=1, le=20)

    # --- admission (per worker) ---------------------------------------------------
    # Misses doing their work before the first token (question embedding, semantic lookup,
    # retrieval) at once; 0 turns admission control off. The rest wait in a queue of at most
    # RAG_ADMISSION_QUEUE, served round-robin by API key, for at most RAG_ADMISSION_WAIT_S;
    # past that: 503 `overloaded` with Retry-After. Cache hits never wait here.
    admission_slots: int = Field(default=4, alias="RAG_ADMISSION_SLOTS", ge=0, le=1024)
    admission_queue: int = Field(default=256, alias="RAG_ADMISSION_QUEUE", ge=0, le=100_000)
    admission_wait_s: float = Field(default=3.0, alias="RAG_ADMISSION_WAIT_S", gt=0, le=600)

    # --- ingest -------------------------------------------------------------------
    # A file over this size is reported and skipped before it is read (raise it for big JSON-lines corpora).
    ingest_max_file_bytes: int = Field(default=50_000_000, alias="RAG_INGEST_MAX_FILE_BYTES", ge=1)
    # Parsing one file (HTML, PDF, JSON lines) stops after this long; the file is reported and skipped.
    ingest_file_timeout_s: float = Field(default=30.0, alias="RAG_INGEST_FILE_TIMEOUT_S", gt=0)

    # --- guardrails -------------------------------------------------------------
    question_max_chars: int = Field(default=4000, alias="RAG_QUESTION_MAX_CHARS", ge=1)
    question_max_tokens: int = Field(default=1000, alias="RAG_QUESTION_MAX_TOKENS", ge=1)
    guard_injection: Literal["block", "flag"] = Field(default="block", alias="RAG_GUARD_INJECTION")
    guard_pii: Literal["redact", "block", "allow"] = Field(default="redact", alias="RAG_GUARD_PII")
    max_body_bytes: int = Field(default=64 * 1024, alias="RAG_MAX_BODY_BYTES", ge=1024)

    # --- keys, limits and exposure ---------------------------------------------------
    # How long a worker trusts its cached copy of a key (revocations also arrive at once by NOTIFY).
    auth_cache_ttl_s: float = Field(default=10.0, alias="RAG_AUTH_CACHE_TTL_S", ge=0)
    auth_failures_per_minute: int = Field(default=20, alias="RAG_AUTH_FAILURES_PER_MINUTE", ge=1)
    # Misses in flight per key given to keys made by `rag-admin keys create` without --max-inflight.
    default_max_inflight: int = Field(default=4, alias="RAG_DEFAULT_MAX_INFLIGHT", ge=1)
    # Comma list of addresses or networks (e.g. "10.0.0.5,172.18.0.0/16") whose X-Forwarded-For
    # and X-Forwarded-Proto are believed; default none: the peer address is the client.
    trusted_proxies: str = Field(default="", alias="RAG_TRUSTED_PROXIES")
    # Keys the question hashes shown in logs, metrics, the dashboard and `matched_question_hash`.
    # Unset: a random one is made once and kept in RAG_DATA_DIR/hash-secret (mode 0600). Give every
    # replica the same value, or their hashes of one question differ.
    hash_secret: SecretStr | None = Field(default=None, alias="RAG_HASH_SECRET")
    metrics_public: bool = Field(
        default=False, alias="RAG_METRICS_PUBLIC", description="Serve /metrics without an admin key."
    )
    # Collections that get their own `collection` label on /metrics (comma-separated); every other
    # collection counts as "other", so the label's cardinality stays bounded by this list.
    metrics_collections: str = Field(default="default", alias="RAG_METRICS_COLLECTIONS")

    # --- tracing (the `otel` extra) -----------------------------------------------
    # Unset: on exactly when OTEL_EXPORTER_OTLP_ENDPOINT is set; true/false force it on or off.
    otel_enabled: bool | None = Field(default=None, alias="RAG_OTEL_ENABLED")
    # The standard OpenTelemetry variable: the collector's base URL; spans go to <it>/v1/traces.
    otel_exporter_otlp_endpoint: str | None = Field(default=None, alias="OTEL_EXPORTER_OTLP_ENDPOINT")

    # --- HTTP -------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", alias="RAG_HOST")
    port: int = Field(default=8000, alias="RAG_PORT", ge=0, le=65535)
    # Swagger UI at /docs (assets from the installed package, strict CSP); `make run` turns it on.
    docs: bool = Field(default=False, alias="RAG_DOCS")
    # Slow clients: a connection gets this long to send a request's headers (from connecting, or
    # from the first byte of its next request), else it is closed; uvicorn has no such timeout.
    http_header_timeout_s: float = Field(default=10.0, alias="RAG_HTTP_HEADER_TIMEOUT_S", gt=0)
    # Idle keep-alive connections are closed after this long (uvicorn's timeout_keep_alive).
    http_keep_alive_s: int = Field(default=5, alias="RAG_HTTP_KEEP_ALIVE_S", ge=1)
    # Open connections plus running requests per worker before uvicorn answers 503.
    http_limit_concurrency: int = Field(default=1000, alias="RAG_HTTP_LIMIT_CONCURRENCY", ge=1)
    log_level: str = Field(default="info", alias="RAG_LOG_LEVEL")
    # json: one JSON object per line (for log shippers); console: aligned, readable text for a terminal.
    log_format: Literal["json", "console"] = Field(default="json", alias="RAG_LOG_FORMAT")

    @field_validator("metrics_collections")
    @classmethod
    def _collection_names(cls, value: str) -> str:
        names = [part.strip() for part in value.split(",") if part.strip()]
        bad = [n for n in names if not valid_name(n)]
        if bad:
            raise ValueError(f"RAG_METRICS_COLLECTIONS: invalid collection name {bad[0]!r}")
        return ",".join(sorted(set(names)))

    def metrics_collection_names(self) -> frozenset[str]:
        return frozenset(n for n in self.metrics_collections.split(",") if n)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: str) -> str:
        for item in (part.strip() for part in value.split(",")):
            if item and item != "*":
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"not an address or network: {item!r}") from None
        return value

    @field_validator(
        "database_url",
        "redis_url",
        "anthropic_api_key",
        "anthropic_base_url",
        "openai_api_key",
        "openai_base_url",
        "embedding_model",
        "torch_threads",
        "model_dir",
        "models_small",
        "models_large",
        "otel_enabled",
        "otel_exporter_otlp_endpoint",
        "hash_secret",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        """`OPENAI_API_KEY=` in a .env file means "not configured", not "configured as empty"."""
        return None if isinstance(value, str) and not value.strip() else value

    def resolved_embedding_model(self) -> str:
        if self.embedding_model:
            return self.embedding_model
        return LOCAL_EMBEDDING_MODEL if self.embedding_provider == "local" else "text-embedding-3-small"

    def resolved_model_dir(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.data_dir / "models"
