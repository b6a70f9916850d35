"""The per-minute series in Redis, written behind: increments are buffered and flushed in batches.

The same numbers as the Prometheus counters, as per-minute hashes (plus hourly roll-ups and the
most-hit question hashes per hour), so the dashboard and `rag-admin cache stats` can aggregate
every worker over any range without a Prometheus server, and the history survives restarts.
Keys (`keyspace.Keyspace.metrics_*`) expire `retention_s` after their bucket closes.

Field names inside a bucket (read back by `dashboard_model.Bucket.of`):
`r:<outcome>`, `tt:<outcome>:<bucket>`, `lt:<outcome>:<bucket>` (TTFT and latency buckets),
`tok:in`, `tok:out`, `cost` (nano-USD), `sav:in`, `sav:out`, `sav:cost`, `tier:<tier>`,
`mdl:<provider>/<model>`, `blk:<code>`, `f:<stage>:<code>`, `pa:<outcome>:<provider>/<model>`,
`ps:<status>`.

Writing never fails a request: a Redis error drops the batch in flight (it can only
under-count), pauses writes for the shared cool-down (`keyspace.CoolDown`), and increments wait
in a bounded buffer until Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Mapping

import redis.asyncio as aioredis

from service.redis.keyspace import BEST_EFFORT_ERRORS, KEYS, CoolDown, Keyspace
from service.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MAX_PENDING = 20_000  # buffered field increments while Redis is away; beyond that they are dropped
TOP_PER_HOUR = 1_000  # most-hit questions kept per hour (the long tail is trimmed)


class SeriesWriter:
    """One per worker: `add` buffers, a background task (`start`) or `flush` writes one MULTI batch."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        retention_s: int,
        keys: Keyspace = KEYS,
        clock: Callable[[], float] = time.time,
        on_dropped: Callable[[], None] = lambda: None,
    ) -> None:
        self.redis = redis
        self.retention_s = retention_s
        self.keys = keys
        self._clock = clock  # wall clock (buckets are epoch minutes shared by all workers); tests pass their own
        self._on_dropped = on_dropped  # counts lost increments (a Prometheus counter)
        self._pending: Tally[tuple[int, str]] = Tally()  # (epoch minute, field) -> increment
        self._pending_top: Tally[tuple[int, str]] = Tally()  # (epoch hour, question hash) -> hits
        self._cool_down = CoolDown("metrics series paused", log)
        self._writes: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None

    def minute(self) -> int:
        """The current epoch minute (by this writer's clock)."""
        return int(self._clock() // 60)

    def start(self, interval_s: float = 1.0) -> None:
        """Write the buffered counts from one background task: a Redis batch per request cost
        more than a cache hit itself and, under load, exhausted the shared connection pool."""
        self._flusher = asyncio.create_task(self._flush_every(interval_s), name="metrics-flush")

    async def _flush_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()

    def add(self, minute: int, fields: Mapping[str, int]) -> None:
        for name, value in fields.items():
            if not value:
                continue
            if len(self._pending) >= MAX_PENDING and (minute, name) not in self._pending:
                self._on_dropped()
                continue
            self._pending[(minute, name)] += value

    def add_top(self, minute: int, question_hash: str) -> None:
        """One more hit for a question (by hash) in the hour of `minute`."""
        top = (minute // 60, question_hash)
        if len(self._pending_top) < MAX_PENDING or top in self._pending_top:
            self._pending_top[top] += 1

    async def flush(self) -> None:
        """Write everything buffered in one MULTI round trip; never raises.

        The write runs in a task of its own and is shielded: a client that disconnects
        mid-request must not lose (or half-write) the numbers.
        """
        if (self._pending or self._pending_top) and self._cool_down.available:
            pending, self._pending = self._pending, Tally()
            top, self._pending_top = self._pending_top, Tally()
            task = asyncio.create_task(self._write(pending, top))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        # Also wait for writes another caller started: a read right after must see them.
        if self._writes:
            await asyncio.shield(asyncio.gather(*self._writes))

    async def _write(self, pending: Mapping[tuple[int, str], int], top: Mapping[tuple[int, str], int]) -> None:
        expire_at: dict[str, int] = {}
        keys = self.keys
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for (minute, name), value in pending.items():
                    hour = minute // 60
                    for key, end in (
                        (keys.metrics_minute(minute), (minute + 1) * 60),
                        (keys.metrics_hour(hour), (hour + 1) * 3600),
                    ):
                        pipe.hincrby(key, name, value)
                        expire_at[key] = end + self.retention_s
                for (hour, qhash), hits in top.items():
                    key = keys.metrics_top(hour)
                    pipe.zincrby(key, hits, qhash)
                    expire_at[key] = (hour + 1) * 3600 + self.retention_s
                for hour in {hour for hour, _ in top}:
                    pipe.zremrangebyrank(keys.metrics_top(hour), 0, -(TOP_PER_HOUR + 1))
                for key, at in expire_at.items():
                    pipe.expireat(key, at)
                await pipe.execute()
        except BEST_EFFORT_ERRORS as exc:
            # The batch may or may not have been applied; dropping it can only under-count.
            self._on_dropped()
            self._cool_down.failed("write", exc)

    async def aclose(self) -> None:
        """Stop the background task and write what is buffered."""
        await cancel_and_wait(self._flusher)
        await self.flush()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
