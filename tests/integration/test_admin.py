"""rag-admin against the real Valkey: stats count cached answers, flush removes only ours."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from service.cli.admin import app as admin_app
from service.observability.metrics import Metrics
from service.redis.answer_cache import AnswerCache, CachedAnswer
from service.settings import Settings
from tests.support.servers import use_cli_env


async def _fill(url: str) -> None:
    client = aioredis.from_url(url)
    cache = AnswerCache(client, ttl_s=60)
    entry = CachedAnswer("answer [1]", {}, [], {}, document_ids=[7], question_hash="abc")
    for key in ("k1", "k2"):
        assert await cache.put(key, entry)
    await client.set("someone-else:key", "keep me")
    await client.set("ragcache:limit:tokens:abc:20261122", 123)  # a key's budget is not the cache's
    await client.aclose()


async def _left(url: str) -> tuple[bool, bytes | str | None, bytes | str | None]:
    client = aioredis.from_url(url)
    try:
        gone = await AnswerCache(client, ttl_s=60).get("k1") is None
        return gone, await client.get("someone-else:key"), await client.get("ragcache:limit:tokens:abc:20261122")
    finally:
        await client.aclose()


@pytest.fixture
def admin_env(settings: Settings, cli: CliRunner) -> Settings:
    """rag-admin reads its settings from the environment: `cli` points it at the test servers."""
    return settings


def test_cache_stats_and_flush(admin_env: Settings) -> None:
    asyncio.run(_fill(str(admin_env.redis_url)))
    runner = CliRunner()

    stats = runner.invoke(admin_app, ["cache", "stats", "--json"])
    assert stats.exit_code == 0, stats.output
    data = json.loads(stats.stdout)
    assert data["answers"] == 2 and data["range"] == "24h"
    assert data["metrics"]["requests"]["total"] == 0 and data["metrics"]["available"] is True

    flushed = runner.invoke(admin_app, ["cache", "flush"])
    assert flushed.exit_code == 0 and flushed.stdout.startswith("3 keys deleted")  # 2 answers + 1 deps set
    assert asyncio.run(_left(str(admin_env.redis_url))) == (True, b"keep me", b"123")


def test_unreachable_redis_is_one_line_and_exit_2(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    use_cli_env(monkeypatch, settings, REDIS_URL="redis://127.0.0.1:1/0")
    result = CliRunner().invoke(admin_app, ["cache", "stats"])
    assert result.exit_code == 2
    assert "cannot reach Redis" in result.output and "Traceback" not in result.output


async def _traffic(url: str) -> None:
    client = aioredis.from_url(url)
    metrics = Metrics(client)
    common: dict[str, Any] = {"tier": None, "provider": None, "model": None, "ttft_ms": 1.0, "latency_ms": 1.0}
    free: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
    for _ in range(3):
        await metrics.answered(
            outcome="hit",
            **common,
            **free,
            saved_input_tokens=1000,
            saved_output_tokens=100,
            saved_cost_usd=0.0015,
            question_hash="0123456789abcdef",
        )
    await metrics.answered(
        outcome="miss",
        **{**common, "tier": "small", "provider": "anthropic", "model": "claude-haiku-4-5", "ttft_ms": 700.0},
        input_tokens=1000,
        output_tokens=100,
        cost_usd=0.0015,
        saved_input_tokens=0,
        saved_output_tokens=0,
        saved_cost_usd=0.0,
        question_hash="0123456789abcdef",
    )
    await metrics.failed(code="prompt_injection", stage="guardrail")
    await metrics.aclose()  # what a worker's shutdown (or its 1 s background flush) writes
    await client.aclose()


def test_cache_stats_shows_the_metrics(admin_env: Settings) -> None:
    asyncio.run(_traffic(str(admin_env.redis_url)))
    runner = CliRunner()

    as_json = runner.invoke(admin_app, ["cache", "stats", "--json", "--range", "1h"])
    assert as_json.exit_code == 0, as_json.output
    metrics = json.loads(as_json.stdout)["metrics"]
    assert metrics["requests"]["by_outcome"]["hit"] == 3 and metrics["requests"]["failed"] == 1
    assert metrics["hit_ratio"]["exact"] == 0.75 and metrics["saved"]["cost_usd"] == 0.0045
    assert metrics["top_questions"] == [{"hash": "0123456789abcdef", "hits": 3}]

    text = runner.invoke(admin_app, ["cache", "stats"])
    assert text.exit_code == 0, text.output
    assert "last 24h: 5 requests, 4 answered, 1 failed" in text.stdout
    assert "hit ratio: 75.0% (exact 75.0%" in text.stdout
    assert "saved: 3,300 tokens (3,000 in, 300 out), $0.0045" in text.stdout
    assert "guardrail blocks: prompt_injection 1" in text.stdout
    assert "0123456789abcdef (3)" in text.stdout

    bad = runner.invoke(admin_app, ["cache", "stats", "--range", "2d"])
    assert bad.exit_code == 2 and "--range" in bad.output
