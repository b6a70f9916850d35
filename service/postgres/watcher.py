"""Keeps the answer cache consistent with the corpus.

Postgres is the truth: every corpus change bumps `corpus.generation` and logs the
documents it replaced or deleted in `corpus_changes` (same transaction). Redis keeps the
generation up to which the cache has been cleaned. Each API worker reconciles the two
on NOTIFY (immediately) and on a short poll (safety net for missed notifications, Redis
outages, changes made while no API ran). Reconciling twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

import asyncpg
from redis.exceptions import RedisError

from service.postgres.db import NOTIFY_CHANNEL
from service.postgres.documents import changes_since
from service.redis.answer_cache import AnswerCache

log = logging.getLogger(__name__)


class CorpusWatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        dsn: str,
        cache: AnswerCache,
        *,
        poll_s: float = 5.0,
        listeners: Mapping[str, Callable[[str], None]] | None = None,
    ) -> None:
        self.pool = pool
        # Other NOTIFY channels that ride on the same connection (e.g. revoked API keys).
        self.listeners = dict(listeners or {})
        self.dsn = dsn
        self.cache = cache
        self.poll_s = poll_s
        # The newest corpus generation whose changes have been applied to the cache. A request
        # that sees it move while generating does not cache its answer (it may be stale).
        self.generation = -1
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None

    async def start(self) -> None:
        await self.reconcile_quietly()
        self._task = asyncio.create_task(self._run(), name="corpus-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_listener()

    async def reconcile(self) -> int:
        """Apply corpus changes the cache has not seen; returns the number of answers dropped."""
        marker = await self.cache.client.get(self.cache.keys.corpus_version)
        if marker is None:
            # A fresh (or flushed) Redis holds no answers older than now: nothing to clean.
            current = int(await self.pool.fetchval("SELECT generation FROM corpus"))
            await self.cache.client.set(self.cache.keys.corpus_version, current)
            self.generation = current
            return 0
        current, changed = await changes_since(self.pool, int(marker))
        dropped = 0
        if current > int(marker):
            dropped = await self.cache.invalidate([*changed, None])
            await self.cache.client.set(self.cache.keys.corpus_version, current)
            log.info("corpus changed: generation %s -> %s, %d cached answers dropped", int(marker), current, dropped)
        self.generation = current
        return dropped

    async def reconcile_quietly(self) -> None:
        try:
            await self.reconcile()
        except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Retried on the next tick; until then the cache may serve answers of the previous
            # corpus version, so writes are held back by the moving generation check.
            self.generation = -1
            log.warning("cache invalidation deferred: %s", type(exc).__name__)

    async def _run(self) -> None:
        while True:
            await self._ensure_listener()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            await self.reconcile_quietly()

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            self._listener = await asyncpg.connect(self.dsn, timeout=5)
            await self._listener.add_listener(NOTIFY_CHANNEL, self._notified)
            for channel, callback in self.listeners.items():
                await self._listener.add_listener(channel, _payload_to(callback))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("cannot LISTEN for corpus changes (%s); polling", type(exc).__name__)
            self._listener = None

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None


def _payload_to(callback: Callable[[str], None]) -> Callable[[object, int, str, str], None]:
    def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        callback(payload)

    return on_notify
