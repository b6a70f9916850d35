"""What the cache saves, recorded once and kept in two stores that answer different questions.

- **Prometheus** (`prometheus.py`, `GET /metrics`) is for an operator's monitoring stack:
  counters and histograms per process (summed over workers in multiprocess mode).
- **Redis** (`series.py`) holds the same numbers as per-minute hashes, so the dashboard and
  `rag-admin cache stats` (`dashboard_model.py`) aggregate every worker over any range without
  a Prometheus server, and the history survives restarts.

`Metrics` is the one recorder the request path talks to: each call updates both. It never fails a
request (the Redis side is written behind and fails soft); the Prometheus side is always exact.

No user text is ever recorded: questions appear only as `question_hash` values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter

from service.answer.events import Done, Meta
from service.observability.dashboard_model import SeriesReader
from service.observability.outcomes import AVOIDED, GENERATED, NANO, bucket_index
from service.observability.prometheus import PrometheusMetrics, mark_process_dead
from service.observability.series import SeriesWriter
from service.policy.collections import DEFAULT, metric_labels
from service.redis.keyspace import KEYS, Keyspace


class Metrics:
    """Records answers and failures (Prometheus + the Redis series); reads back summaries and series.

    One per worker (built in the app's lifespan, with the app's `PrometheusMetrics`).
    `answered`, `failed` and `provider_attempt` are buffered for Redis and written by the
    writer's background task (`start`) or the next `flush`.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prometheus: PrometheusMetrics | None = None,
        retention_s: int = 7 * 24 * 3600,
        keys: Keyspace = KEYS,
        clock: Callable[[], float] = time.time,
        collections: Iterable[str] = (DEFAULT,),
    ) -> None:
        self.prometheus = prometheus if prometheus is not None else PrometheusMetrics()
        self.collections = frozenset(collections)  # those with a `collection` label of their own
        self.writer = SeriesWriter(
            redis, retention_s=retention_s, keys=keys, clock=clock, on_dropped=self.prometheus.redis_errors.inc
        )
        self.reader = SeriesReader(redis, keys=keys, clock=clock)

    @property
    def redis(self) -> aioredis.Redis:
        return self.writer.redis

    @redis.setter
    def redis(self, client: aioredis.Redis) -> None:
        self.writer.redis = self.reader.redis = client

    def start(self, interval_s: float = 1.0) -> None:
        self.writer.start(interval_s)

    async def flush(self) -> None:
        """Write what is buffered (see `SeriesWriter.flush`); never raises."""
        await self.writer.flush()

    async def aclose(self) -> None:
        """Flush what is buffered and, in multiprocess mode, do prometheus-client's bookkeeping for this pid."""
        await self.writer.aclose()
        mark_process_dead()

    # -- reading (everything this worker buffered is written first) -----------------------------
    async def summary(self, *, minutes: int, top: int = 10) -> dict[str, Any]:
        await self.flush()
        return await self.reader.summary(minutes=minutes, top=top)

    async def series(self, *, minutes: int, step: int = 1) -> list[dict[str, Any]]:
        await self.flush()
        return await self.reader.series(minutes=minutes, step=step)

    # -- recording ----------------------------------------------------------------------------
    async def answered(
        self,
        *,
        outcome: str,
        tier: str | None,
        provider: str | None,
        model: str | None,
        ttft_ms: float | None,
        latency_ms: float,
        input_tokens: int,
        output_tokens: int,
        cost_usd: float,
        saved_input_tokens: int,
        saved_output_tokens: int,
        saved_cost_usd: float,
        question_hash: str,
        collections: Sequence[str] = (),
    ) -> None:
        """One answered request (a `done` event was sent), whatever its cache outcome.

        Route mix counts generations only (miss, bypass): a hit or a coalesced answer made
        no routing decision of its own, whatever route its stored answer names.
        """
        p = self.prometheus
        p.requests.labels(outcome).inc()
        if outcome in AVOIDED:
            p.avoided.inc()
        if outcome == "coalesced":
            p.coalesced.inc()
        if ttft_ms is not None:
            p.ttft.labels(outcome).observe(max(ttft_ms, 0.0) / 1000)
        p.latency.labels(outcome).observe(max(latency_ms, 0.0) / 1000)
        _inc(p.tokens.labels("input"), input_tokens)
        _inc(p.tokens.labels("output"), output_tokens)
        _inc(p.tokens_saved.labels("input"), saved_input_tokens)
        _inc(p.tokens_saved.labels("output"), saved_output_tokens)
        _inc(p.cost, cost_usd)
        _inc(p.cost_saved, saved_cost_usd)
        generated = outcome in GENERATED
        if generated and tier:
            p.routes.labels(tier, provider or "", model or "").inc()

        minute = self.writer.minute()
        fields: dict[str, int] = {
            f"r:{outcome}": 1,
            f"lt:{outcome}:{bucket_index(latency_ms)}": 1,
            "tok:in": input_tokens,
            "tok:out": output_tokens,
            "cost": round(cost_usd * NANO),
            "sav:in": saved_input_tokens,
            "sav:out": saved_output_tokens,
            "sav:cost": round(saved_cost_usd * NANO),
        }
        if ttft_ms is not None:
            fields[f"tt:{outcome}:{bucket_index(ttft_ms)}"] = 1
        for label in metric_labels(collections, self.collections):
            p.collection_requests.labels(label, outcome).inc()
            fields[f"col:{label}:{outcome}"] = 1
        if generated and tier:
            fields[f"tier:{tier}"] = 1
            if model:
                fields[f"mdl:{provider or ''}/{model}"] = 1
        self.writer.add(minute, fields)
        if outcome in AVOIDED and question_hash:
            self.writer.add_top(minute, question_hash)

    async def record(self, meta: Meta, done: Done, question_hash: str, collections: Sequence[str] = ()) -> None:
        """`answered` from an answer's own `meta` and `done` events (what the client was told)."""
        saved = done.saved
        await self.answered(
            outcome=meta.cache,
            tier=meta.route.tier,
            provider=meta.route.provider,
            model=meta.route.model,
            ttft_ms=done.ttft_ms,
            latency_ms=done.latency_ms,
            input_tokens=done.usage.input_tokens,
            output_tokens=done.usage.output_tokens,
            cost_usd=done.usage.cost_usd,
            saved_input_tokens=saved.input_tokens if saved else 0,
            saved_output_tokens=saved.output_tokens if saved else 0,
            saved_cost_usd=saved.cost_usd if saved else 0.0,
            question_hash=question_hash,
            collections=collections,
        )

    async def failed(self, *, code: str, stage: str) -> None:
        """A request that ended in an error (before or during its stream); guardrail ones are blocks."""
        self.prometheus.failures.labels(stage, code).inc()
        fields = {f"f:{stage}:{code}": 1}
        if stage == "guardrail":
            self.prometheus.blocks.labels(code).inc()
            fields[f"blk:{code}"] = 1
        self.writer.add(self.writer.minute(), fields)

    def provider_attempt(self, *, provider: str, model: str, outcome: str, status: int | None = None) -> None:
        """One provider call (or SDK retry). Synchronous so generation code can call it anywhere;
        its Redis part is written with the next `answered`/`failed`/`flush`."""
        p = self.prometheus
        p.attempts.labels(provider, model, outcome).inc()
        fields = {f"pa:{outcome}:{provider}/{model}": 1}
        if outcome in ("error", "timeout"):
            label = "timeout" if outcome == "timeout" and status is None else str(status or "none")
            p.provider_errors.labels(provider, model, label).inc()
            fields[f"ps:{label}"] = 1
        elif outcome == "retry":
            p.retries.labels(provider, model).inc()
        self.writer.add(self.writer.minute(), fields)


def _inc(counter: Counter, amount: float) -> None:
    if amount > 0:
        counter.inc(amount)
