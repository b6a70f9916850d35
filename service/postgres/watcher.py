"""Keeps the answer cache consistent with the corpus.

Postgres is the truth: every corpus change bumps the corpus version (column
`corpus.generation`) and logs the documents it replaced or deleted in `corpus_changes` (same
transaction). Redis keeps the corpus version up to which the cache has been cleaned. Each API
worker reconciles the two on NOTIFY (immediately, through the worker's `NotificationRelay`) and
on a short poll (safety net for missed notifications, Redis outages, changes made while no API
ran). Reconciling twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
from redis.exceptions import RedisError

from service.errors import PoolExhausted
from service.postgres.db import DATABASE_ERRORS, NOTIFY_CHANNEL
from service.postgres.documents import changes_since
from service.postgres.notifications import NotificationRelay
from service.redis.answer_cache import AnswerCache
from service.tasks import cancel_and_wait

log = logging.getLogger(__name__)
_OUTAGES: tuple[type[Exception], ...] = (RedisError, *DATABASE_ERRORS)  # either store away: retry later


class CorpusWatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: AnswerCache,
        relay: NotificationRelay,
        *,
        poll_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.cache = cache
        self.poll_s = poll_s
        # The newest corpus version whose changes have been applied to the cache. A request
        # that sees it move while generating does not cache its answer (it may be stale).
        self.corpus_version = -1
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        relay.subscribe(NOTIFY_CHANNEL, self._notified)

    async def start(self) -> None:
        await self.reconcile_quietly()
        self._task = asyncio.create_task(self._run(), name="corpus-watcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def reconcile(self) -> int:
        """Apply corpus changes the cache has not seen; returns the number of answers dropped."""
        marker = await self.cache.client.get(self.cache.keys.corpus_version)
        if marker is None:
            # A fresh (or flushed) Redis holds no answers older than now: nothing to clean.
            current = int(await self.pool.fetchval("SELECT generation FROM corpus"))
            await self.cache.client.set(self.cache.keys.corpus_version, current)
            self.corpus_version = current
            return 0
        current, changed = await changes_since(self.pool, int(marker))
        dropped = 0
        if current > int(marker):
            dropped = await self.cache.invalidate([*changed, None])
            await self.cache.client.set(self.cache.keys.corpus_version, current)
            log.info("corpus changed: version %s -> %s, %d cached answers dropped", int(marker), current, dropped)
        self.corpus_version = current
        return dropped

    async def reconcile_quietly(self) -> None:
        try:
            await self.reconcile()
        except PoolExhausted:
            # This worker's Redis pool is busy, Redis is fine: keep the version we know and retry
            # on the next tick (a change missed meanwhile is applied then, as with a late NOTIFY).
            log.info("cache invalidation check deferred: the Redis pool is busy")
        except _OUTAGES as exc:
            # Retried on the next tick; until then the cache may serve answers of the previous
            # corpus version, so writes are held back by the moving version check.
            self.corpus_version = -1
            log.warning("cache invalidation deferred: %s", type(exc).__name__)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            await self.reconcile_quietly()

    def _notified(self, _payload: str) -> None:
        self._wake.set()
