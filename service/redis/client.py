"""Where Redis is (configured, or an embedded Valkey) and the clients the service opens on it:
four pooled clients per API worker (`WorkerRedis`), a plain one for the CLIs.

A worker's Redis traffic is split so that one kind cannot starve another:

- `requests`: the answer cache, taking coalescing leases, the corpus marker, metrics
  (`RAG_REDIS_MAX_CONNECTIONS`);
- `limits`: rate limits, token budgets, in-flight slots, failed-auth counts
  (`RAG_REDIS_LIMIT_CONNECTIONS`), so a busy request pool never makes a limit fail open;
- `followers`: coalescing followers' `XREAD BLOCK` (`RAG_REDIS_FOLLOWER_CONNECTIONS`), which
  holds a connection for as long as it waits and must not hold the request pool's;
- `publish`: a coalescing leader's writes once it leads: its answer's events, one round trip
  per batch per stream, and its lease's renewals and release (`RAG_REDIS_PUBLISH_CONNECTIONS`),
  so that a few hundred streams publishing at once never starve the cache's reads and writes.

Every pool is a `BackPressurePool`: when no connection comes free in time it raises the domain
error `PoolExhausted` (503 `overloaded`), never redis-py's `ConnectionError`, which the fail-soft
callers would take for "Redis is down" (service/redis/keyspace.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from service.embedded import EmbeddedValkey, start_valkey
from service.errors import PoolExhausted
from service.settings import Settings

# Short timeouts: Redis is optional at run time (see keyspace.CoolDown), so a dead Redis must
# fail a call fast rather than hold a request.
WORKER_TIMEOUT_S = 1.0
LIMITS_POOL_WAIT_S = 2.0  # a limit check waits longer for a connection rather than refuse
CLI_TIMEOUT_S = 5.0


def redis_url(settings: Settings) -> tuple[str, EmbeddedValkey | None]:
    """REDIS_URL, or the URL of an embedded Valkey started (or reused) under RAG_DATA_DIR; its handle to stop."""
    if settings.redis_url:
        return settings.redis_url, None
    server = start_valkey(settings.data_dir)
    return server.url, server


class BackPressurePool(aioredis.BlockingConnectionPool):
    """A blocking pool whose wait for a free connection ends in `PoolExhausted`, not `ConnectionError`."""

    def __init__(self, *, pool_name: str = "redis", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_name = pool_name

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            # redis-py's wording for a timed-out wait; a refused or reset socket keeps its error.
            if str(exc) == "No connection available.":
                raise PoolExhausted(self.pool_name) from exc
            raise


def worker_client(
    url: str, *, max_connections: int, wait_s: float = WORKER_TIMEOUT_S, name: str = "requests"
) -> aioredis.Redis:
    """A client whose pool waits (up to `wait_s`) for a free connection, then raises `PoolExhausted`."""
    pool = BackPressurePool.from_url(
        url,
        pool_name=name,
        max_connections=max_connections,
        timeout=wait_s,
        socket_timeout=WORKER_TIMEOUT_S,
        socket_connect_timeout=WORKER_TIMEOUT_S,
    )
    return aioredis.Redis(connection_pool=pool)


@dataclass(frozen=True)
class WorkerRedis:
    """One API worker's four Redis pools (see the module doc)."""

    requests: aioredis.Redis
    limits: aioredis.Redis
    followers: aioredis.Redis
    publish: aioredis.Redis

    @classmethod
    def open(cls, url: str, settings: Settings) -> WorkerRedis:
        return cls(
            requests=worker_client(url, max_connections=settings.redis_max_connections),
            limits=worker_client(
                url, max_connections=settings.redis_limit_connections, wait_s=LIMITS_POOL_WAIT_S, name="limits"
            ),
            followers=worker_client(url, max_connections=settings.redis_follower_connections, name="followers"),
            publish=worker_client(url, max_connections=settings.redis_publish_connections, name="publish"),
        )

    @property
    def limits_busy(self) -> bool:
        """Every connection of the limits pool is in use right now (a check would have to wait)."""
        return not self.limits.connection_pool.can_get_connection()

    async def aclose(self) -> None:
        for client in (self.requests, self.limits, self.followers, self.publish):
            await client.aclose()


def cli_client(url: str) -> aioredis.Redis:
    """A client for one command of `rag-admin`."""
    return aioredis.from_url(url, socket_timeout=CLI_TIMEOUT_S, socket_connect_timeout=CLI_TIMEOUT_S)
