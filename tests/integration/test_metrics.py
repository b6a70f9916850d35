"""Metrics against the real Valkey: exact totals, percentiles, zero-filled series, retention,
several workers, Redis down, and the Prometheus exposition (also in multiprocess mode)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

import service.redis.keyspace as keyspace
from service.answer.events import Done, Meta
from service.answer.schemas import RouteInfo, UsageInfo
from service.embeddings.encoders import LocalEmbedder
from service.http.app import create_app
from service.http.auth import Scope
from service.observability.metrics import Metrics
from service.settings import Settings
from tests.support.metrics import in_bucket_of
from tests.support.servers import ROOT, bearer, make_key, serve_app, wait_until

RETENTION = 7 * 24 * 3600


class Clock:
    """A wall clock the test moves by hand (Metrics buckets by epoch minute)."""

    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at

    def advance(self, minutes: float) -> None:
        self.at += minutes * 60


def mid_hour_now() -> float:
    """Now, moved back to 30 minutes past the hour: a 1 h range then needs minute keys only on one side."""
    now = time.time()
    return now - now % 3600 + 30 * 60 + 7


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.from_url(redis_url)
    yield redis
    await redis.aclose()


@pytest.fixture
def clock() -> Clock:
    return Clock(mid_hour_now())


async def answer(metrics: Metrics, outcome: str, **overrides: Any) -> None:
    values: dict[str, Any] = {
        "outcome": outcome,
        "tier": None,
        "provider": None,
        "model": None,
        "ttft_ms": 1.0,
        "latency_ms": 2.0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cost_usd": 0.0,
        "saved_input_tokens": 0,
        "saved_output_tokens": 0,
        "saved_cost_usd": 0.0,
        "question_hash": "",
    }
    values.update(overrides)
    await metrics.answered(**values)


async def traffic(m: Metrics) -> None:
    """A known mix: 3 hits, 1 semantic hit, 1 coalesced, 2 misses, 1 bypass, 3 failures, 7 provider calls."""
    saved = {"saved_input_tokens": 100, "saved_output_tokens": 20, "saved_cost_usd": 0.0005}
    for _ in range(3):
        await answer(m, "hit", ttft_ms=1.0, latency_ms=1.2, question_hash="aaaa", **saved)
    semantic = {"saved_input_tokens": 50, "saved_output_tokens": 10, "saved_cost_usd": 0.0002, "question_hash": "bbbb"}
    # A hit's stored route (tier) is not a routing decision: not in the route mix.
    await answer(m, "semantic_hit", ttft_ms=3.0, latency_ms=3.5, tier="small", **semantic)
    await answer(m, "coalesced", ttft_ms=200.0, latency_ms=900.0, question_hash="cccc", **saved)
    haiku = {"tier": "small", "provider": "anthropic", "model": "claude-haiku-4-5", "question_hash": "dddd"}
    spent = {"input_tokens": 1000, "output_tokens": 200, "cost_usd": 0.002}
    for ttft in (800.0, 1200.0):
        await answer(m, "miss", ttft_ms=ttft, latency_ms=ttft + 500, **spent, **haiku)
    # '/' and ':' in a model name survive the field encoding
    llama = {"tier": "large", "provider": "openai", "model": "meta-llama/Llama-3.1-8B:q4", "question_hash": "eeee"}
    await answer(
        m, "bypass", ttft_ms=900.0, latency_ms=1500.0, input_tokens=500, output_tokens=100, cost_usd=0.001, **llama
    )
    await m.failed(code="prompt_injection", stage="guardrail")
    await m.failed(code="prompt_injection", stage="guardrail")
    await m.failed(code="providers_unavailable", stage="provider")
    for _ in range(3):
        m.provider_attempt(provider="anthropic", model="claude-haiku-4-5", outcome="ok")
    m.provider_attempt(provider="anthropic", model="claude-haiku-4-5", outcome="error", status=529)
    m.provider_attempt(provider="openai", model="gpt-4o", outcome="timeout")
    m.provider_attempt(provider="anthropic", model="claude-haiku-4-5", outcome="retry", status=429)
    m.provider_attempt(provider="anthropic", model="claude-haiku-4-5", outcome="retry", status=429)


async def test_summary_numbers_are_exact(client: aioredis.Redis, clock: Clock) -> None:
    m = Metrics(client, clock=clock)
    await traffic(m)
    s = await m.summary(minutes=60)

    assert s["available"] is True
    assert s["requests"] == {
        "answered": 8,
        "failed": 3,
        "total": 11,
        "by_outcome": {"hit": 3, "semantic_hit": 1, "coalesced": 1, "miss": 2, "bypass": 1},
    }
    # Bypass is not cache-eligible: 7 eligible requests.
    assert s["hit_ratio"] == {
        "exact": round(3 / 7, 6),
        "semantic": round(1 / 7, 6),
        "coalesced": round(1 / 7, 6),
        "overall": round(5 / 7, 6),
    }
    assert s["provider_calls"] == {"made": 3, "avoided": 5}
    assert s["coalesced_followers"] == 1
    assert s["saved"] == {"input_tokens": 450, "output_tokens": 90, "tokens": 540, "cost_usd": 0.0022}
    assert s["tokens"] == {"input": 2500, "output": 500, "cost_usd": 0.005}

    ttft = s["ttft_ms"]
    assert (ttft["hit"]["count"], ttft["miss"]["count"], ttft["coalesced"]["count"]) == (4, 3, 1)
    assert in_bucket_of(1.0)(ttft["hit"]["p50"]) and in_bucket_of(3.0)(ttft["hit"]["p95"])
    assert in_bucket_of(900.0)(ttft["miss"]["p50"]) and in_bucket_of(1200.0)(ttft["miss"]["p95"])
    assert in_bucket_of(200.0)(ttft["coalesced"]["p50"])
    assert in_bucket_of(1.2)(s["latency_ms"]["hit"]["p50"])

    assert s["routes"]["tiers"] == {"small": 2, "large": 1}
    assert sorted((r["provider"], r["model"], r["count"]) for r in s["routes"]["models"]) == [
        ("anthropic", "claude-haiku-4-5", 2),
        ("openai", "meta-llama/Llama-3.1-8B:q4", 1),
    ]
    assert s["blocks"] == {"total": 2, "by_code": {"prompt_injection": 2}}
    assert sorted((f["stage"], f["code"], f["count"]) for f in s["failures"]) == [
        ("guardrail", "prompt_injection", 2),
        ("provider", "providers_unavailable", 1),
    ]
    provider = s["provider"]
    assert provider["attempts"] == {"ok": 3, "error": 1, "timeout": 1, "retry": 2}
    assert (provider["errors"], provider["retries"]) == (2, 2)
    assert provider["by_status"] == {"529": 1, "timeout": 1}
    assert {
        (r["provider"], r["model"]): (r["ok"], r["error"], r["timeout"], r["retry"]) for r in provider["by_model"]
    } == {
        ("anthropic", "claude-haiku-4-5"): (3, 1, 0, 2),
        ("openai", "gpt-4o"): (0, 0, 1, 0),
    }
    # Only hit-like answers count as "hits" of a question; misses and bypasses do not.
    assert s["top_questions"][0] == {"hash": "aaaa", "hits": 3}
    assert sorted((q["hash"], q["hits"]) for q in s["top_questions"]) == [("aaaa", 3), ("bbbb", 1), ("cccc", 1)]


async def test_series_is_zero_filled_and_sums_to_the_summary(client: aioredis.Redis, clock: Clock) -> None:
    m = Metrics(client, clock=clock)
    first_minute = int(clock() // 60)
    await answer(m, "hit", saved_input_tokens=10, saved_cost_usd=0.25)
    await answer(m, "miss", input_tokens=7)
    clock.advance(2)
    await answer(m, "semantic_hit", saved_output_tokens=5)
    await m.failed(code="empty_question", stage="guardrail")

    rows = await m.series(minutes=5)
    assert [r["t"] for r in rows] == [(first_minute - 2 + i) * 60 for i in range(5)]
    assert [(r["hit"], r["semantic_hit"], r["miss"], r["failed"], r["blocked"]) for r in rows] == [
        (0, 0, 0, 0, 0),
        (0, 0, 0, 0, 0),
        (1, 0, 1, 0, 0),
        (0, 0, 0, 0, 0),
        (0, 1, 0, 1, 1),
    ]
    assert rows[2]["hit_ratio"] == 0.5 and rows[2]["exact_ratio"] == 0.5 and rows[2]["semantic_ratio"] == 0.0
    assert rows[0]["hit_ratio"] is None  # no requests: no ratio, not 0 %
    assert rows[2]["saved_tokens"] == 10 and rows[2]["saved_cost_usd"] == 0.25 and rows[2]["tokens"] == 7
    assert rows[4]["saved_tokens"] == 5

    # Rows of any width add up to the summary of the same window, hourly roll-ups included.
    for minutes, step in ((60, 1), (24 * 60, 15), (7 * 24 * 60, 60)):
        rows = await m.series(minutes=minutes, step=step)
        summary = await m.summary(minutes=minutes)
        assert sum(r["answered"] for r in rows) == summary["requests"]["answered"] == 3
        assert sum(r["failed"] for r in rows) == summary["requests"]["failed"] == 1
        assert sum(r["saved_cost_usd"] for r in rows) == summary["saved"]["cost_usd"] == 0.25
        assert all(r["t"] % (step * 60) == 0 for r in rows)
        assert len(rows) in (-(-minutes // step), -(-minutes // step) + 1)

    # Outside the window: gone from the 1 h view, still in the 24 h one.
    clock.advance(90)
    assert (await m.summary(minutes=60))["requests"]["total"] == 0
    assert (await m.summary(minutes=24 * 60))["requests"]["total"] == 4


async def test_keys_expire_after_the_retention(client: aioredis.Redis, clock: Clock) -> None:
    m = Metrics(client, clock=clock, retention_s=3600)
    await answer(m, "hit", question_hash="abcd")
    await m.flush()  # counts are buffered and written by a 1 s background flush (or on read)
    minute = int(clock() // 60)
    hour = minute // 60
    assert await client.expiretime(keyspace.KEYS.metrics_minute(minute)) == (minute + 1) * 60 + 3600
    assert await client.expiretime(keyspace.KEYS.metrics_hour(hour)) == (hour + 1) * 3600 + 3600
    assert await client.expiretime(keyspace.KEYS.metrics_top(hour)) == (hour + 1) * 3600 + 3600
    default = Metrics(client, clock=clock)
    assert default.writer.retention_s == RETENTION
    await answer(default, "miss")
    await default.flush()
    assert await client.expiretime(keyspace.KEYS.metrics_minute(minute)) == (minute + 1) * 60 + RETENTION
    # Nothing but counters and hashes: no user text anywhere in the keys or values.
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await client.keys("ragcache:metrics:*"))
    ks = keyspace.KEYS
    assert keys == [ks.metrics_hour(hour), ks.metrics_minute(minute), ks.metrics_top(hour)]


async def test_two_workers_aggregate(redis_url: str, clock: Clock) -> None:
    one, two = aioredis.from_url(redis_url), aioredis.from_url(redis_url)
    try:
        a, b = Metrics(one, clock=clock), Metrics(two, clock=clock)
        await answer(a, "hit", ttft_ms=1.0, saved_input_tokens=100, saved_cost_usd=0.001, question_hash="q1")
        await answer(b, "hit", ttft_ms=1.0, saved_input_tokens=100, saved_cost_usd=0.002, question_hash="q1")
        await answer(b, "miss", ttft_ms=500.0, tier="small", provider="extractive", model="extractive")
        a.provider_attempt(provider="extractive", model="extractive", outcome="ok")
        await a.flush()  # what each worker's 1 s background flush does
        await b.flush()
        for reader in (a, b):
            s = await reader.summary(minutes=60)  # either worker sees both
            assert s["requests"]["by_outcome"]["hit"] == 2 and s["requests"]["answered"] == 3
            assert s["saved"]["cost_usd"] == 0.003 and s["saved"]["input_tokens"] == 200
            assert s["top_questions"] == [{"hash": "q1", "hits": 2}]
            assert s["ttft_ms"]["hit"]["count"] == 2 and in_bucket_of(1.0)(s["ttft_ms"]["hit"]["p50"])
            assert s["provider"]["attempts"]["ok"] == 1
            assert s["hit_ratio"]["overall"] == round(2 / 3, 6)
    finally:
        await one.aclose()
        await two.aclose()


async def test_redis_down_never_raises(
    redis_url: str, clock: Clock, monkeypatch: pytest.MonkeyPatch, client: aioredis.Redis
) -> None:
    monkeypatch.setattr(keyspace, "COOL_DOWN_S", 0.2)
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    m = Metrics(dead, clock=clock)
    started = time.perf_counter()
    await answer(m, "hit")
    await m.flush()  # this batch is lost (it may or may not have reached Redis); cool-down starts
    await answer(m, "miss")  # within the cool-down: buffered, no round trip
    await m.failed(code="empty_question", stage="guardrail")
    m.provider_attempt(provider="openai", model="gpt-4o", outcome="error", status=500)
    assert time.perf_counter() - started < 2.0
    s = await m.summary(minutes=60)
    assert s["available"] is False and s["requests"]["total"] == 0 and s["top_questions"] == []
    rows = await m.series(minutes=10)
    assert len(rows) == 10 and all(r["answered"] == 0 for r in rows)

    # Redis is back: what was buffered during the cool-down is written with the next request.
    m.redis = client
    await dead.aclose()
    await asyncio.sleep(0.25)
    await answer(m, "hit")
    s = await m.summary(minutes=60)
    assert s["available"] is True
    assert s["requests"]["by_outcome"]["hit"] == 1 and s["requests"]["by_outcome"]["miss"] == 1
    assert s["blocks"]["by_code"] == {"empty_question": 1} and s["provider"]["by_status"] == {"500": 1}


# -- HTTP: /metrics and the dashboard API, on the real app ---------------------------------------
@asynccontextmanager
async def served(
    settings: Settings, embedder: LocalEmbedder, key_scope: Scope | None = "admin", **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Metrics]]:
    """create_app on uvicorn, a client with a key of `key_scope` (None: no key), and the app's own Metrics."""
    app = create_app(settings.model_copy(update=overrides), embedder=embedder)
    headers = bearer(await make_key(settings, key_scope)) if key_scope else {}
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, headers=headers) as http:
        yield http, app.state.resources.metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_prometheus_exposition(settings: Settings, local_embedder: LocalEmbedder) -> None:
    async with served(settings, local_embedder) as (http, m):
        before = samples((await http.get("/metrics")).text)
        await traffic(m)
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("ragcache_requests_total", outcome="hit") == 3
    assert delta("ragcache_requests_total", outcome="coalesced") == 1
    assert delta("ragcache_provider_calls_avoided_total") == 5
    assert delta("ragcache_coalesced_followers_total") == 1
    assert delta("ragcache_tokens_saved_total", direction="input") == 450
    assert delta("ragcache_cost_saved_usd_total") == pytest.approx(0.0022)
    assert delta("ragcache_tokens_total", direction="input") == 2500
    assert delta("ragcache_ttft_seconds_count", outcome="miss") == 2
    assert delta("ragcache_ttft_seconds_bucket", outcome="hit", le="0.001") == 3
    assert delta("ragcache_request_latency_seconds_count", outcome="bypass") == 1
    assert delta("ragcache_routes_total", tier="small", provider="anthropic", model="claude-haiku-4-5") == 2
    assert delta("ragcache_guardrail_blocks_total", code="prompt_injection") == 2
    assert delta("ragcache_request_failures_total", stage="provider", code="providers_unavailable") == 1
    assert delta("ragcache_provider_attempts_total", provider="anthropic", model="claude-haiku-4-5", outcome="ok") == 3
    assert delta("ragcache_provider_errors_total", provider="anthropic", model="claude-haiku-4-5", status="529") == 1
    assert delta("ragcache_provider_errors_total", provider="openai", model="gpt-4o", status="timeout") == 1
    assert delta("ragcache_provider_retries_total", provider="anthropic", model="claude-haiku-4-5") == 2
    ratio = after[("ragcache_cache_hit_ratio", (("kind", "overall"),))]
    assert 0 < ratio <= 1


def test_prometheus_multiprocess_mode_sums_workers(tmp_path: Path) -> None:
    """Two worker processes write their files; a third (any worker serving /metrics) sums them."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    record = (
        "import asyncio, redis.asyncio as r; from service.observability.metrics import Metrics\n"
        "async def main():\n"
        "    m = Metrics(r.from_url('redis://127.0.0.1:1/0', socket_connect_timeout=0.2))\n"
        "    await m.answered(outcome='hit', tier=None, provider=None, model=None, ttft_ms=1.0, latency_ms=1.0,\n"
        "        input_tokens=0, output_tokens=0, cost_usd=0.0, saved_input_tokens=10, saved_output_tokens=0,\n"
        "        saved_cost_usd=0.0, question_hash='x')\n"
        "    await m.aclose()\n"
        "asyncio.run(main())\n"
    )
    for _ in range(2):
        subprocess.run([sys.executable, "-c", record], env=env, check=True, timeout=60, cwd=str(ROOT))
    scrape = (
        "import json; from service.observability.prometheus import PrometheusMetrics, multiprocess_enabled\n"
        "print(json.dumps([multiprocess_enabled(), PrometheusMetrics().exposition().decode()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", scrape], env=env, check=True, timeout=60, cwd=str(ROOT), capture_output=True, text=True
    )
    enabled, text = json.loads(out.stdout)
    assert enabled is True
    values = samples(text)
    assert values[("ragcache_requests_total", (("outcome", "hit"),))] == 2
    assert values[("ragcache_tokens_saved_total", (("direction", "input"),))] == 20
    assert values[("ragcache_cache_hit_ratio", (("kind", "exact"),))] == 1.0


async def test_metrics_need_an_admin_key_unless_configured_public(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    async with served(settings, local_embedder, key_scope=None) as (http, _):
        missing = await http.get("/metrics")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/metrics", headers=bearer(await make_key(settings, "query")))).status_code == 403
        assert (await http.get("/metrics", headers=bearer(await make_key(settings, "admin")))).status_code == 200
        assert (await http.get("/dashboard/api/summary")).status_code == 401
        assert (await http.get("/dashboard")).status_code == 200  # the page itself holds no data
    async with served(settings, local_embedder, key_scope=None, metrics_public=True) as (http, _):
        open_scrape = await http.get("/metrics")
        assert open_scrape.status_code == 200 and "ragcache_requests_total" in open_scrape.text
        assert (await http.get("/dashboard/api/summary")).status_code == 401  # only /metrics opens


async def test_dashboard_api_and_headers(settings: Settings, local_embedder: LocalEmbedder) -> None:
    async with served(settings, local_embedder) as (http, m):
        await answer(m, "hit", question_hash="feed", saved_input_tokens=3)
        await answer(m, "miss", tier="small", provider="extractive", model="extractive")
        page = await http.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for response in (page, await http.get("/dashboard/api/summary")):
            csp = response.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
            assert response.headers["x-frame-options"] == "DENY"
        assert "<script" in page.text and "dashboard/static/dashboard.js" in page.text
        assert "<script>" not in page.text and " style=" not in page.text  # nothing inline for the CSP to block

        for name, kind in (
            ("dashboard.js", "text/javascript"),
            ("dashboard.css", "text/css"),
            ("favicon.svg", "image/svg"),
        ):
            asset = await http.get(f"/dashboard/static/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
            assert asset.headers["x-content-type-options"] == "nosniff"
        for path in ("..%2Fmetrics.py", "metrics.py", ".hidden.js", "nope.js"):
            assert (await http.get(f"/dashboard/static/{path}")).status_code == 404, path

        summary = (await http.get("/dashboard/api/summary", params={"range": "24h"})).json()
        assert summary["range"] == "24h" and summary["minutes"] == 1440
        assert summary["requests"]["by_outcome"]["hit"] == 1 and summary["top_questions"] == [
            {"hash": "feed", "hits": 1}
        ]
        series = (await http.get("/dashboard/api/series", params={"range": "7d"})).json()
        assert series["step_s"] == 3600 and sum(r["answered"] for r in series["rows"]) == 2
        assert len((await http.get("/dashboard/api/series")).json()["rows"]) == 60  # default 1h, per minute
        bad = await http.get("/dashboard/api/summary", params={"range": "2y"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


async def test_record_from_events(client: aioredis.Redis, clock: Clock) -> None:
    """What the pipeline calls: the numbers come from the same events the client received."""
    m = Metrics(client, clock=clock)
    route = RouteInfo(tier="small", model="claude-haiku-4-5", provider="anthropic", reason="auto")
    paid = UsageInfo(input_tokens=1200, output_tokens=150, cost_usd=0.00195)
    free = UsageInfo(input_tokens=0, output_tokens=0, cost_usd=0.0)
    await m.record(Meta("r1", "miss", route, []), Done(paid, 812.0, 640.0, cached=False), "q")
    await m.record(Meta("r2", "hit", route, []), Done(free, 0.9, 0.8, cached=True, saved=paid), "q")
    s = await m.summary(minutes=60)
    assert s["requests"]["by_outcome"] == {"hit": 1, "semantic_hit": 0, "coalesced": 0, "miss": 1, "bypass": 0}
    assert s["tokens"] == {"input": 1200, "output": 150, "cost_usd": 0.00195}
    assert s["saved"] == {"input_tokens": 1200, "output_tokens": 150, "tokens": 1350, "cost_usd": 0.00195}
    assert s["routes"]["tiers"] == {"small": 1} and s["top_questions"] == [{"hash": "q", "hits": 1}]
    assert in_bucket_of(640.0)(s["ttft_ms"]["miss"]["p50"]) and in_bucket_of(0.8)(s["ttft_ms"]["hit"]["p50"])


async def test_background_flush_writes_without_a_read(client: aioredis.Redis, clock: Clock) -> None:
    m = Metrics(client, clock=clock)
    m.start(interval_s=0.05)
    try:
        await answer(m, "hit", question_hash="abcd")
        key = keyspace.KEYS.metrics_minute(int(clock() // 60))
        await wait_until(lambda: client.exists(key), within=5)
        assert (await m.summary(minutes=1))["requests"]["by_outcome"]["hit"] == 1
    finally:
        await m.aclose()
