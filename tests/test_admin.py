"""rag-admin against the real Valkey: stats count cached answers, flush removes only ours."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from service.admin import app as admin_app
from service.cache import AnswerCache, CachedAnswer
from service.settings import Settings
from tests.conftest import cli_env


async def _fill(url: str) -> None:
    client = aioredis.from_url(url)
    cache = AnswerCache(client, ttl_s=60)
    entry = CachedAnswer("answer [1]", {}, [], {}, document_ids=[7], question_hash="abc")
    for key in ("k1", "k2"):
        assert await cache.put(key, entry)
    await client.set("someone-else:key", "keep me")
    await client.aclose()


async def _left(url: str) -> tuple[bool, bytes | None]:
    client = aioredis.from_url(url)
    try:
        return await AnswerCache(client, ttl_s=60).get("k1") is None, await client.get("someone-else:key")
    finally:
        await client.aclose()


def test_cache_stats_and_flush(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in cli_env(settings).items():
        monkeypatch.setenv(key, value)
    asyncio.run(_fill(str(settings.redis_url)))
    runner = CliRunner()

    stats = runner.invoke(admin_app, ["cache", "stats", "--json"])
    assert stats.exit_code == 0, stats.output
    assert json.loads(stats.stdout) == {"answers": 2}

    flushed = runner.invoke(admin_app, ["cache", "flush"])
    assert flushed.exit_code == 0 and flushed.stdout.startswith("3 keys deleted")  # 2 answers + 1 deps set
    assert asyncio.run(_left(str(settings.redis_url))) == (True, b"keep me")


def test_unreachable_redis_is_one_line_and_exit_2(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in cli_env(settings, REDIS_URL="redis://127.0.0.1:1/0").items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(admin_app, ["cache", "stats"])
    assert result.exit_code == 2
    assert "cannot reach Redis" in result.output and "Traceback" not in result.output
