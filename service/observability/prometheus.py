"""The Prometheus exposition (`GET /metrics`): one `PrometheusMetrics` object per app.

Counters and histograms per process, scraped and stored by the operator's Prometheus. The app
creates its `PrometheusMetrics` (a registry of its own, so two apps in one process never
collide); nothing here is a module-level mutable global.

With `rag-serve --workers N` every worker is a separate process, so prometheus-client's
multiprocess mode must be on: `rag-serve` calls `prepare_multiprocess_dir` in the parent before
the workers start (they inherit `PROMETHEUS_MULTIPROC_DIR`), and the exposition then sums every
worker's files. prometheus-client reads the variable when it is first imported, so a process
cannot switch modes later; `multiprocess_enabled` says which mode this one is in.
"""

from __future__ import annotations

import os
from collections import Counter as Tally
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from service.observability.outcomes import ELIGIBLE, hit_ratios

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)


def multiprocess_enabled() -> bool:
    """True when this process writes its metrics to PROMETHEUS_MULTIPROC_DIR.

    prometheus-client decides at import time; checking its value class (not only the
    environment) avoids reading an empty directory when the variable was set too late.
    """
    return values.ValueClass is not values.MutexValue and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def prepare_multiprocess_dir(data_dir: Path) -> Path:
    """Point prometheus-client's multiprocess mode at a clean directory; call before starting workers.

    `rag-serve --workers N` (N > 1) calls this in the parent, before uvicorn spawns the
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


def mark_process_dead() -> None:
    """In multiprocess mode, prometheus-client's bookkeeping for a worker that exits."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


class PrometheusMetrics:
    """The metric objects of one app, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # process_*, python_* (read-only)
            r.register(collector)
        self.requests = Counter("ragcache_requests", "Answered requests by cache outcome.", ["outcome"], registry=r)
        self.avoided = Counter(
            "ragcache_provider_calls_avoided", "Answers served without a provider call (hits, coalesced).", registry=r
        )
        self.coalesced = Counter(
            "ragcache_coalesced_followers", "Requests that joined an identical in-flight generation.", registry=r
        )
        self.tokens = Counter("ragcache_tokens", "Provider tokens paid for, by direction.", ["direction"], registry=r)
        self.tokens_saved = Counter(
            "ragcache_tokens_saved", "Provider tokens a cached or coalesced answer avoided.", ["direction"], registry=r
        )
        self.cost = Counter("ragcache_cost_usd", "USD paid to providers (RAG_PRICING).", registry=r)
        self.cost_saved = Counter(
            "ragcache_cost_saved_usd", "USD a cached or coalesced answer avoided paying.", registry=r
        )
        self.ttft = Histogram(
            "ragcache_ttft_seconds",
            "Time to first token by cache outcome.",
            ["outcome"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.latency = Histogram(
            "ragcache_request_latency_seconds",
            "Total answer time by cache outcome.",
            ["outcome"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.collection_requests = Counter(
            "ragcache_collection_requests",
            "Answered requests by collection they could read (RAG_METRICS_COLLECTIONS; others count as "
            '"other", keys reading every collection as "all") and cache outcome.',
            ["collection", "outcome"],
            registry=r,
        )
        self.admission_wait = Histogram(
            "ragcache_admission_wait_seconds",
            "Time a miss waited for an admission slot (admitted or refused).",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.routes = Counter(
            "ragcache_routes",
            "Generations by routed tier and answering model.",
            ["tier", "provider", "model"],
            registry=r,
        )
        self.failures = Counter(
            "ragcache_request_failures", "Failed requests by stage and code.", ["stage", "code"], registry=r
        )
        self.blocks = Counter(
            "ragcache_guardrail_blocks", "Questions rejected by the input guardrails.", ["code"], registry=r
        )
        self.attempts = Counter(
            "ragcache_provider_attempts", "Provider calls by result.", ["provider", "model", "outcome"], registry=r
        )
        self.provider_errors = Counter(
            "ragcache_provider_errors",
            "Provider calls that failed (error or timeout), by HTTP status.",
            ["provider", "model", "status"],
            registry=r,
        )
        self.retries = Counter("ragcache_provider_retries", "Provider call retries.", ["provider", "model"], registry=r)
        self.redis_errors = Counter(
            "ragcache_metrics_redis_errors", "Failed writes of the per-minute series (numbers lost).", registry=r
        )

    def all(self) -> tuple[MetricWrapperBase, ...]:
        """Every metric object (what the Grafana dashboard may query, with the hit-ratio gauge)."""
        return tuple(v for v in vars(self).values() if isinstance(v, MetricWrapperBase))

    def exposition(self) -> bytes:
        """The text exposition of this app, or of every worker in multiprocess mode (`CONTENT_TYPE`)."""
        if multiprocess_enabled():
            source = CollectorRegistry()
            multiprocess.MultiProcessCollector(source)  # type: ignore[no-untyped-call]
        else:
            source = self.registry
        registry = CollectorRegistry(auto_describe=False)
        registry.register(HitRatios(source))
        return generate_latest(registry)


class HitRatios:
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
            for kind, share in hit_ratios(by_outcome, eligible).items():
                ratio.add_metric([kind], share)
        yield ratio
