"""What the cache saves: Prometheus counters in-process, per-minute series in Redis.

Two stores because they answer two different questions:

- **Prometheus** (`GET /metrics`) is for an operator's monitoring stack: counters and
  histograms per process, scraped and stored by Prometheus itself. With
  `rag-serve --workers N` every worker is a separate process, so prometheus-client's
  multiprocess mode must be on (`PROMETHEUS_MULTIPROC_DIR`, see
  `prepare_multiprocess_dir`); the exposition then sums every worker's files.
- **Redis** holds the same numbers as per-minute hashes (plus hourly roll-ups), so the
  dashboard and `rag-admin cache stats` can aggregate every worker over any range
  without a Prometheus server, and the history survives restarts. Keys expire
  `retention_s` after their bucket closes.

Metrics never fail a request: every Redis error is swallowed, after one the Redis side
pauses for `COOL_DOWN_S` (a dead Redis then costs nothing per request) and increments
wait in a bounded buffer until it is back. The Prometheus side is always exact.

No user text is ever recorded: questions appear only as `question_hash` values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from redis.exceptions import RedisError
from starlette.responses import Response

from service.answer.events import Done, Meta

log = logging.getLogger(__name__)

OUTCOMES = ("hit", "semantic_hit", "coalesced", "miss", "bypass")
AVOIDED = frozenset({"hit", "semantic_hit", "coalesced"})  # answered without a provider call of their own
GENERATED = frozenset({"miss", "bypass"})  # answered by a provider call of their own
ELIGIBLE = ("hit", "semantic_hit", "coalesced", "miss")  # could have been served by the cache (not bypass)
# TTFT/latency classes the dashboard compares; semantic hits replay a stored answer like exact hits.
CLASSES: dict[str, tuple[str, ...]] = {
    "hit": ("hit", "semantic_hit"),
    "miss": ("miss", "bypass"),
    "coalesced": ("coalesced",),
}
ATTEMPT_OUTCOMES = ("ok", "error", "timeout", "retry")

# Fixed log-spaced buckets (ms), identical in every process, so per-minute counts from any
# number of workers add up and p50/p95 come out for any range. Factor 1.25 = at most 25 %
# error before interpolation; 0.1 ms .. ~127 s, then one overflow bucket.
BUCKET_FACTOR = 1.25
BUCKET_BOUNDS_MS: tuple[float, ...] = tuple(0.1 * BUCKET_FACTOR**i for i in range(64))

COOL_DOWN_S = 2.0
MAX_PENDING = 20_000  # buffered field increments while Redis is away; beyond that they are dropped
TOP_PER_HOUR = 1_000  # most-hit questions kept per hour (the long tail is trimmed)
NANO = 1_000_000_000  # costs are summed as integer nano-dollars: exact across workers, no float drift

_PROM_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)


# -- buckets and percentiles ---------------------------------------------------------------
def bucket_index(ms: float) -> int:
    """Index of the bucket holding `ms`: the first whose upper bound is >= ms."""
    return bisect_left(BUCKET_BOUNDS_MS, max(ms, 0.0))


def bucket_range(index: int) -> tuple[float, float]:
    """(lower, upper] of a bucket in ms; the overflow bucket's upper bound is infinite."""
    lower = 0.0 if index == 0 else BUCKET_BOUNDS_MS[index - 1]
    upper = BUCKET_BOUNDS_MS[index] if index < len(BUCKET_BOUNDS_MS) else math.inf
    return lower, upper


def percentile(counts: Mapping[int, int], q: float) -> float | None:
    """The q-quantile of bucketed values, interpolated inside its bucket like histogram_quantile."""
    total = sum(c for c in counts.values() if c > 0)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index in sorted(counts):
        count = counts[index]
        if count <= 0:
            continue
        if seen + count >= rank:
            lower, upper = bucket_range(index)
            if math.isinf(upper):
                return round(lower, 3)
            return round(lower + (upper - lower) * (rank - seen) / count, 3)
        seen += count
    return round(bucket_range(max(counts))[0], 3)  # only for q > 1


# -- Prometheus ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Prom:
    """The process's metric objects (one set per process, shared by every app in it)."""

    requests: Counter
    avoided: Counter
    coalesced: Counter
    tokens: Counter
    tokens_saved: Counter
    cost: Counter
    cost_saved: Counter
    ttft: Histogram
    latency: Histogram
    routes: Counter
    failures: Counter
    blocks: Counter
    attempts: Counter
    provider_errors: Counter
    retries: Counter
    redis_errors: Counter


_prom_lock = threading.Lock()
_prom_metrics: _Prom | None = None


def _prom() -> _Prom:
    """Create the metric objects once per process, on first use.

    prometheus-client registers every metric in its default registry; creating them a
    second time (a second app in the same test process) would raise "Duplicated
    timeseries", so they live at module level and every `Metrics` shares them.
    """
    global _prom_metrics
    with _prom_lock:
        if _prom_metrics is None:
            _prom_metrics = _Prom(
                requests=Counter("ragcache_requests", "Answered requests by cache outcome.", ["outcome"]),
                avoided=Counter(
                    "ragcache_provider_calls_avoided", "Answers served without a provider call (hits, coalesced)."
                ),
                coalesced=Counter(
                    "ragcache_coalesced_followers", "Requests that joined an identical in-flight generation."
                ),
                tokens=Counter("ragcache_tokens", "Provider tokens paid for, by direction.", ["direction"]),
                tokens_saved=Counter(
                    "ragcache_tokens_saved", "Provider tokens a cached or coalesced answer avoided.", ["direction"]
                ),
                cost=Counter("ragcache_cost_usd", "USD paid to providers (RAG_PRICING)."),
                cost_saved=Counter("ragcache_cost_saved_usd", "USD a cached or coalesced answer avoided paying."),
                ttft=Histogram(
                    "ragcache_ttft_seconds",
                    "Time to first token by cache outcome.",
                    ["outcome"],
                    buckets=_PROM_LATENCY_BUCKETS_S,
                ),
                latency=Histogram(
                    "ragcache_request_latency_seconds",
                    "Total answer time by cache outcome.",
                    ["outcome"],
                    buckets=_PROM_LATENCY_BUCKETS_S,
                ),
                routes=Counter(
                    "ragcache_routes", "Generations by routed tier and answering model.", ["tier", "provider", "model"]
                ),
                failures=Counter("ragcache_request_failures", "Failed requests by stage and code.", ["stage", "code"]),
                blocks=Counter("ragcache_guardrail_blocks", "Questions rejected by the input guardrails.", ["code"]),
                attempts=Counter(
                    "ragcache_provider_attempts", "Provider calls by result.", ["provider", "model", "outcome"]
                ),
                provider_errors=Counter(
                    "ragcache_provider_errors",
                    "Provider calls that failed (error or timeout), by HTTP status.",
                    ["provider", "model", "status"],
                ),
                retries=Counter("ragcache_provider_retries", "Provider call retries.", ["provider", "model"]),
                redis_errors=Counter(
                    "ragcache_metrics_redis_errors", "Failed writes of the per-minute series (numbers lost)."
                ),
            )
        return _prom_metrics


def multiprocess_enabled() -> bool:
    """True when this process writes its metrics to PROMETHEUS_MULTIPROC_DIR.

    prometheus-client decides at import time; checking its value class (not only the
    environment) avoids reading an empty directory when the variable was set too late.
    """
    return values.ValueClass is not values.MutexValue and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def prepare_multiprocess_dir(data_dir: Path) -> Path:
    """Point prometheus-client's multiprocess mode at a clean directory; call before starting workers.

    `rag-serve --workers N` (N > 1) must call this in the parent, before uvicorn spawns the
    workers: they inherit the variable and write their counters there, and `/metrics`
    (served by any worker) sums them. Files of a previous run are removed, as
    prometheus-client requires. With one worker it is unnecessary.
    """
    path = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or Path(data_dir) / "prometheus")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


class _WithRatios:
    """Every metric of `source`, plus `ragcache_cache_hit_ratio` derived from the request counters.

    A ratio cannot be a counter; computing it at scrape time from the (multiprocess-summed)
    counters keeps it right across workers without a multiprocess gauge.
    """

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        by_outcome: Tally[str] = Tally()
        for family in self.source.collect():
            for sample in family.samples:
                if sample.name == "ragcache_requests_total":
                    by_outcome[sample.labels.get("outcome", "")] += int(sample.value)
            yield family
        eligible = sum(by_outcome[o] for o in ELIGIBLE)
        ratio = GaugeMetricFamily(
            "ragcache_cache_hit_ratio",
            "Share of cache-eligible requests (not bypass) served without a generation of their own, "
            "since the counters started.",
            labels=["kind"],
        )
        if eligible:
            for kind, share in _ratios(by_outcome, eligible).items():
                ratio.add_metric([kind], share)
        yield ratio


def metrics_app_response() -> Response:
    """The Prometheus exposition of this process, or of every worker in multiprocess mode."""
    _prom()  # present (at zero where unlabelled) even before the first request
    if multiprocess_enabled():
        source = CollectorRegistry()
        multiprocess.MultiProcessCollector(source)  # type: ignore[no-untyped-call]
    else:
        source = REGISTRY
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WithRatios(source))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def failure_stage(status: int, code: str) -> str:
    """The `stage` label of an error answered before the stream started (an `APIError`).

    Failures after the first token are `"stream"`; the caller knows those apart.
    """
    if status == 400:
        return "guardrail"
    if status in (413, 422):
        return "schema"
    if code == "database_unavailable":
        return "database"
    return "provider"  # providers_unavailable, embedding_unavailable, generation_failed, ...


def _ratios(by_outcome: Mapping[str, int], eligible: int) -> dict[str, float]:
    hit, semantic, coalesced = (
        by_outcome.get("hit", 0),
        by_outcome.get("semantic_hit", 0),
        by_outcome.get("coalesced", 0),
    )
    return {
        "exact": hit / eligible,
        "semantic": semantic / eligible,
        "coalesced": coalesced / eligible,
        "overall": (hit + semantic + coalesced) / eligible,
    }


# -- reading the Redis series ------------------------------------------------------------
@dataclass
class _Parsed:
    """One aggregated bucket (a minute, an hour, a chart row or a whole range), decoded."""

    outcomes: Tally[str] = field(default_factory=Tally)
    ttft: dict[str, Tally[int]] = field(default_factory=dict)
    latency: dict[str, Tally[int]] = field(default_factory=dict)
    tokens_in: int = 0
    tokens_out: int = 0
    cost_nanos: int = 0
    saved_in: int = 0
    saved_out: int = 0
    saved_nanos: int = 0
    tiers: Tally[str] = field(default_factory=Tally)
    models: Tally[str] = field(default_factory=Tally)
    blocks: Tally[str] = field(default_factory=Tally)
    failures: Tally[tuple[str, str]] = field(default_factory=Tally)
    attempts: Tally[tuple[str, str]] = field(default_factory=Tally)  # (outcome, "provider/model")
    statuses: Tally[str] = field(default_factory=Tally)

    @classmethod
    def of(cls, fields: Mapping[str, int]) -> _Parsed:
        p = cls()
        scalars = {
            "tok:in": "tokens_in",
            "tok:out": "tokens_out",
            "cost": "cost_nanos",
            "sav:in": "saved_in",
            "sav:out": "saved_out",
            "sav:cost": "saved_nanos",
        }
        for name, value in fields.items():
            kind, _, rest = name.partition(":")
            if name in scalars:
                setattr(p, scalars[name], getattr(p, scalars[name]) + value)
            elif kind == "r":
                p.outcomes[rest] += value
            elif kind in ("tt", "lt"):
                outcome, _, index = rest.rpartition(":")
                target = p.ttft if kind == "tt" else p.latency
                target.setdefault(outcome, Tally())[int(index)] += value
            elif kind == "tier":
                p.tiers[rest] += value
            elif kind == "mdl":
                p.models[rest] += value
            elif kind == "blk":
                p.blocks[rest] += value
            elif kind == "f":
                stage, _, code = rest.partition(":")
                p.failures[(stage, code)] += value
            elif kind == "pa":
                outcome, _, model = rest.partition(":")
                p.attempts[(outcome, model)] += value
            elif kind == "ps":
                p.statuses[rest] += value
        return p

    @property
    def answered(self) -> int:
        return sum(self.outcomes.values())

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def buckets(self, kind: str, cls: str) -> Tally[int]:
        source = self.ttft if kind == "ttft" else self.latency
        merged: Tally[int] = Tally()
        for outcome in CLASSES[cls]:
            merged.update(source.get(outcome, {}))
        return merged

    def hit_ratio(self) -> dict[str, float | None]:
        eligible = sum(self.outcomes[o] for o in ELIGIBLE)
        if not eligible:
            return {"exact": None, "semantic": None, "coalesced": None, "overall": None}
        return {k: round(v, 6) for k, v in _ratios(self.outcomes, eligible).items()}


def _split_model(key: str) -> tuple[str, str]:
    provider, _, model = key.partition("/")
    return provider, model


def _decode(raw: Mapping[Any, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, value in raw.items():
        try:
            out[name.decode() if isinstance(name, bytes) else str(name)] = int(value)
        except (TypeError, ValueError):  # a field another version wrote as a float: ignore it
            continue
    return out


# -- the recorder --------------------------------------------------------------------------------
class Metrics:
    """Records answers and failures; reads back summaries and per-minute series.

    One per worker (built in the app's lifespan). `answered` and `failed` cost one
    pipelined (MULTI) round trip to Redis; `provider_attempt` is synchronous and its
    Redis part rides along with the next write.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        retention_s: int = 7 * 24 * 3600,
        prefix: str = "ragcache",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.retention_s = retention_s
        self.prefix = prefix
        self._clock = clock  # wall clock (buckets are epoch minutes shared by all workers); tests pass their own
        self._prom = _prom()
        self._pending: Tally[tuple[int, str]] = Tally()  # (epoch minute, field) -> increment
        self._pending_top: Tally[tuple[int, str]] = Tally()  # (epoch hour, question hash) -> hits
        self._down_until = 0.0
        self._writes: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None

    def start(self, interval_s: float = 1.0) -> None:
        """Write the buffered counts from one background task: a Redis batch per request cost
        more than a cache hit itself and, under load, exhausted the shared connection pool."""
        self._flusher = asyncio.create_task(self._flush_every(interval_s), name="metrics-flush")

    async def _flush_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()

    # -- keys ----------------------------------------------------------------------------------
    def minute_key(self, minute: int) -> str:
        return f"{self.prefix}:metrics:m:{minute}"

    def hour_key(self, hour: int) -> str:
        return f"{self.prefix}:metrics:h:{hour}"

    def top_key(self, hour: int) -> str:
        return f"{self.prefix}:metrics:q:{hour}"

    def _minute(self) -> int:
        return int(self._clock() // 60)

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
    ) -> None:
        """One answered request (a `done` event was sent), whatever its cache outcome.

        Route mix counts generations only (miss, bypass): a hit or a coalesced answer made
        no routing decision of its own, whatever route its stored answer names.
        """
        p = self._prom
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

        minute = self._minute()
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
        if generated and tier:
            fields[f"tier:{tier}"] = 1
            if model:
                fields[f"mdl:{provider or ''}/{model}"] = 1
        self._add(minute, fields)
        if outcome in AVOIDED and question_hash:
            top = (minute // 60, question_hash)
            if len(self._pending_top) < MAX_PENDING or top in self._pending_top:
                self._pending_top[top] += 1

    async def record(self, meta: Meta, done: Done, question_hash: str) -> None:
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
        )

    async def failed(self, *, code: str, stage: str) -> None:
        """A request that ended in an error (before or during its stream); guardrail ones are blocks."""
        self._prom.failures.labels(stage, code).inc()
        fields = {f"f:{stage}:{code}": 1}
        if stage == "guardrail":
            self._prom.blocks.labels(code).inc()
            fields[f"blk:{code}"] = 1
        self._add(self._minute(), fields)

    def provider_attempt(self, *, provider: str, model: str, outcome: str, status: int | None = None) -> None:
        """One provider call (or SDK retry). Synchronous so generation code can call it anywhere;
        its Redis part is written with the next `answered`/`failed`/`flush`."""
        p = self._prom
        p.attempts.labels(provider, model, outcome).inc()
        fields = {f"pa:{outcome}:{provider}/{model}": 1}
        if outcome in ("error", "timeout"):
            label = "timeout" if outcome == "timeout" and status is None else str(status or "none")
            p.provider_errors.labels(provider, model, label).inc()
            fields[f"ps:{label}"] = 1
        elif outcome == "retry":
            p.retries.labels(provider, model).inc()
        self._add(self._minute(), fields)

    def _add(self, minute: int, fields: Mapping[str, int]) -> None:
        for name, value in fields.items():
            if not value:
                continue
            if len(self._pending) >= MAX_PENDING and (minute, name) not in self._pending:
                self._prom.redis_errors.inc()
                continue
            self._pending[(minute, name)] += value

    async def flush(self) -> None:
        """Write everything buffered in one MULTI round trip; never raises.

        The write runs in a task of its own and is shielded: a client that disconnects
        mid-request must not lose (or half-write) the numbers.
        """
        if (self._pending or self._pending_top) and time.monotonic() >= self._down_until:
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
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for (minute, name), value in pending.items():
                    hour = minute // 60
                    for key, end in (
                        (self.minute_key(minute), (minute + 1) * 60),
                        (self.hour_key(hour), (hour + 1) * 3600),
                    ):
                        pipe.hincrby(key, name, value)
                        expire_at[key] = end + self.retention_s
                for (hour, qhash), hits in top.items():
                    key = self.top_key(hour)
                    pipe.zincrby(key, hits, qhash)
                    expire_at[key] = (hour + 1) * 3600 + self.retention_s
                for hour in {hour for hour, _ in top}:
                    pipe.zremrangebyrank(self.top_key(hour), 0, -(TOP_PER_HOUR + 1))
                for key, at in expire_at.items():
                    pipe.expireat(key, at)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            # The batch may or may not have been applied; dropping it can only under-count.
            self._prom.redis_errors.inc()
            if time.monotonic() >= self._down_until:
                log.warning("metrics: redis unavailable, series paused for %.0fs (%s)", COOL_DOWN_S, type(exc).__name__)
            self._down_until = time.monotonic() + COOL_DOWN_S

    async def aclose(self) -> None:
        """Flush what is buffered and, in multiprocess mode, do prometheus-client's bookkeeping for this pid."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if multiprocess_enabled():
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    # -- reading --------------------------------------------------------------------------------
    def _keys_for(self, start: int, end: int) -> list[str]:
        """Keys whose sum is exactly minutes start..end: hourly roll-ups for whole hours, minutes for the edges."""
        first_hour, last_hour = -(-start // 60), (end + 1) // 60 - 1
        if first_hour > last_hour:
            return [self.minute_key(m) for m in range(start, end + 1)]
        return [
            *(self.minute_key(m) for m in range(start, first_hour * 60)),
            *(self.hour_key(h) for h in range(first_hour, last_hour + 1)),
            *(self.minute_key(m) for m in range((last_hour + 1) * 60, end + 1)),
        ]

    async def _read(
        self, spans: list[tuple[int, int]], top: tuple[int, int, int] | None = None
    ) -> tuple[list[_Parsed], list[tuple[str, int]]] | None:
        """Aggregate each (start, end) minute span, and optionally the top questions; None if Redis fails."""
        plans = [self._keys_for(start, end) for start, end in spans]
        keys = list(dict.fromkeys(k for plan in plans for k in plan))
        tmp = f"{self.prefix}:metrics:tmp:{uuid.uuid4().hex}"
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                if top is not None:
                    first_hour, last_hour, n = top
                    pipe.zunionstore(tmp, [self.top_key(h) for h in range(first_hour, last_hour + 1)])
                    pipe.expire(tmp, 30)
                    pipe.zrevrange(tmp, 0, n - 1, withscores=True)
                    pipe.delete(tmp)
                replies = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("metrics: cannot read the series (%s)", type(exc).__name__)
            return None
        by_key = {key: _decode(reply) for key, reply in zip(keys, replies, strict=False)}
        parsed = []
        for plan in plans:
            total: Tally[str] = Tally()
            for key in plan:
                total.update(by_key[key])
            parsed.append(_Parsed.of(total))
        questions: list[tuple[str, int]] = []
        if top is not None:
            ranked = replies[len(keys) + 2]
            questions = [(m.decode() if isinstance(m, bytes) else str(m), int(s)) for m, s in ranked]
        return parsed, questions

    async def summary(self, *, minutes: int, top: int = 10) -> dict[str, Any]:
        """Totals for the last `minutes` (including the current, partial minute), across all workers.

        Most-hit questions are counted per hour, so their window is widened to whole hours.
        """
        await self.flush()
        minutes = max(1, int(minutes))
        end = self._minute()
        start = end - minutes + 1
        read = await self._read([(start, end)], (start // 60, end // 60, max(1, top)))
        parsed, questions = read if read is not None else ([_Parsed()], [])
        return self._summarize(parsed[0], questions, start, end, minutes, available=read is not None)

    async def series(self, *, minutes: int, step: int = 1) -> list[dict[str, Any]]:
        """Rows of `step` minutes, oldest to newest, covering the last `minutes`; empty rows are zeros.

        Rows start at multiples of `step` (hourly rows on the hour, `t` in epoch seconds); the
        last one holds the current minute, the first only the part inside the window, so
        the rows sum to `summary`. Redis down: the same rows, all zero.
        """
        await self.flush()
        step = max(1, int(step))
        end = self._minute()
        start = end - max(1, int(minutes)) + 1
        last_start = end - end % step
        starts = range(start - start % step, last_start + 1, step)
        # The first row is clipped to the window, so the rows add up to `summary(minutes=...)` exactly.
        spans = [(max(s, start), min(s + step - 1, end)) for s in starts]
        read = await self._read(spans)
        rows = read[0] if read is not None else [_Parsed() for _ in spans]
        return [_row(s * 60, parsed) for s, parsed in zip(starts, rows, strict=True)]

    def _summarize(
        self, p: _Parsed, questions: list[tuple[str, int]], start: int, end: int, minutes: int, *, available: bool
    ) -> dict[str, Any]:
        by_outcome = {o: p.outcomes.get(o, 0) for o in OUTCOMES}
        by_outcome.update({o: n for o, n in p.outcomes.items() if o not in by_outcome})
        attempts: Tally[str] = Tally()
        per_model: dict[str, dict[str, Any]] = {}
        for (outcome, key), n in p.attempts.items():
            attempts[outcome] += n
            provider, model = _split_model(key)
            row = per_model.setdefault(
                key, {"provider": provider, "model": model, **dict.fromkeys(ATTEMPT_OUTCOMES, 0)}
            )
            row[outcome] = row.get(outcome, 0) + n
        return {
            "minutes": minutes,
            "from": start * 60,
            "to": (end + 1) * 60,
            "available": available,  # False: Redis could not be read, every number below is 0
            "requests": {
                "answered": p.answered,
                "failed": p.failed,
                "total": p.answered + p.failed,
                "by_outcome": by_outcome,
            },
            "hit_ratio": p.hit_ratio(),
            "provider_calls": {
                "made": sum(p.outcomes[o] for o in GENERATED),
                "avoided": sum(p.outcomes[o] for o in AVOIDED),
            },
            "coalesced_followers": p.outcomes.get("coalesced", 0),
            "tokens": {"input": p.tokens_in, "output": p.tokens_out, "cost_usd": p.cost_nanos / NANO},
            "saved": {
                "input_tokens": p.saved_in,
                "output_tokens": p.saved_out,
                "tokens": p.saved_in + p.saved_out,
                "cost_usd": p.saved_nanos / NANO,
            },
            "ttft_ms": {cls: _quantiles(p.buckets("ttft", cls)) for cls in CLASSES},
            "latency_ms": {cls: _quantiles(p.buckets("latency", cls)) for cls in CLASSES},
            "routes": {
                "tiers": dict(p.tiers.most_common()),
                "models": [
                    {"provider": _split_model(k)[0], "model": _split_model(k)[1], "count": n}
                    for k, n in p.models.most_common()
                ],
            },
            "blocks": {"total": sum(p.blocks.values()), "by_code": dict(p.blocks.most_common())},
            "failures": [{"stage": stage, "code": code, "count": n} for (stage, code), n in p.failures.most_common()],
            "provider": {
                "attempts": {o: attempts.get(o, 0) for o in ATTEMPT_OUTCOMES}
                | {o: n for o, n in attempts.items() if o not in ATTEMPT_OUTCOMES},
                "errors": attempts.get("error", 0) + attempts.get("timeout", 0),
                "retries": attempts.get("retry", 0),
                "by_status": dict(p.statuses.most_common()),
                "by_model": sorted(per_model.values(), key=lambda r: (r["provider"], r["model"])),
            },
            "top_questions": [{"hash": h, "hits": n} for h, n in questions],
        }


def _quantiles(buckets: Mapping[int, int]) -> dict[str, Any]:
    return {"count": sum(buckets.values()), "p50": percentile(buckets, 0.5), "p95": percentile(buckets, 0.95)}


def _row(t: int, p: _Parsed) -> dict[str, Any]:
    ratio = p.hit_ratio()
    hit_ttft, miss_ttft = p.buckets("ttft", "hit"), p.buckets("ttft", "miss")
    return {
        "t": t,
        **{o: p.outcomes.get(o, 0) for o in OUTCOMES},
        "answered": p.answered,
        "failed": p.failed,
        "blocked": sum(p.blocks.values()),
        "hit_ratio": ratio["overall"],
        "exact_ratio": ratio["exact"],
        "semantic_ratio": ratio["semantic"],
        "coalesced_ratio": ratio["coalesced"],
        "tokens": p.tokens_in + p.tokens_out,
        "cost_usd": p.cost_nanos / NANO,
        "saved_tokens": p.saved_in + p.saved_out,
        "saved_cost_usd": p.saved_nanos / NANO,
        "ttft_p50_hit": percentile(hit_ttft, 0.5),
        "ttft_p95_hit": percentile(hit_ttft, 0.95),
        "ttft_p50_miss": percentile(miss_ttft, 0.5),
        "ttft_p95_miss": percentile(miss_ttft, 0.95),
        "provider_errors": sum(n for (o, _), n in p.attempts.items() if o in ("error", "timeout")),
    }


def _inc(counter: Counter, amount: float) -> None:
    if amount > 0:
        counter.inc(amount)
