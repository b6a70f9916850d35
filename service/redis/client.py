"""Where Redis is (configured, or an embedded Valkey) and the clients the service opens on it:
one pooled client per API worker, a plain one for the CLIs."""

from __future__ import annotations

import redis.asyncio as aioredis

from service.embedded import EmbeddedValkey, start_valkey
from service.settings import Settings

# Short timeouts: Redis is optional at run time (see keyspace.CoolDown), so a dead Redis must
# fail a call fast rather than hold a request.
WORKER_TIMEOUT_S = 1.0
CLI_TIMEOUT_S = 5.0


def redis_url(settings: Settings) -> tuple[str, EmbeddedValkey | None]:
    """REDIS_URL, or the URL of an embedded Valkey started (or reused) under RAG_DATA_DIR; its handle to stop."""
    if settings.redis_url:
        return settings.redis_url, None
    server = start_valkey(settings.data_dir)
    return server.url, server


def worker_client(url: str, *, max_connections: int) -> aioredis.Redis:
    """A client whose pool waits (up to a second) for a free connection instead of failing at its size limit."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=WORKER_TIMEOUT_S,
        socket_timeout=WORKER_TIMEOUT_S,
        socket_connect_timeout=WORKER_TIMEOUT_S,
    )
    return aioredis.Redis(connection_pool=pool)


def cli_client(url: str) -> aioredis.Redis:
    """A client for one command of `rag-admin`."""
    return aioredis.from_url(url, socket_timeout=CLI_TIMEOUT_S, socket_connect_timeout=CLI_TIMEOUT_S)
