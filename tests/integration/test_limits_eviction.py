"""Caps that survive a full Redis (issue 11, docs/operations.md "Bounded memory"): Redis runs
bounded under `volatile-lru`, which evicts keys with a TTL when memory runs out. Cached answers
must make room; a key's spent budget, its requests-per-minute window, its answers in flight and
an address's failed authentications must not, or the cap would fail open without a word.

The eviction tests run a Valkey of their own (configured as `rag-serve` runs it) and shrink its
`maxmemory`, so the session's shared server is not disturbed. The day-rollover test uses the
shared server and passes the clock (`now`) explicitly.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.embedded import start_valkey
from service.embeddings.encoders import LocalEmbedder
from service.errors import BudgetExceeded, RateLimited
from service.redis.keyspace import KEYS
from service.redis.limits import Limiter, utc_day
from service.settings import Settings
from tests.support.answers import ask, charged, running, seed
from tests.support.servers import make_key

FILLER = b"x" * 2000
DAY = 86_400.0
NOW = 20_000 * DAY + 3600.0  # some UTC day, 01:00


@dataclass(frozen=True)
class Caller:
    key_id: str
    rpm: int | None = None
    tokens_per_day: int | None = None
    max_inflight: int | None = None


async def fill_until_evicting(client: aioredis.Redis, *, evictions: int = 20_000) -> int:
    """Shrink `maxmemory` and write cached-answer-sized keys with a TTL until Redis has evicted
    `evictions` keys (about 14 times what fits: every key with a TTL is evicted many times over);
    returns how many it evicted."""
    await client.config_set("maxmemory", "4mb")
    before = int((await client.info("stats"))["evicted_keys"])
    written = 0
    while int((await client.info("stats"))["evicted_keys"]) - before < evictions:
        async with client.pipeline(transaction=False) as pipe:
            for i in range(written, written + 500):
                pipe.set(KEYS.answer(f"filler{i}"), FILLER, ex=3600)
            await pipe.execute()
        written += 500
    return int((await client.info("stats"))["evicted_keys"]) - before


async def test_a_spent_budget_survives_eviction_and_still_refuses(
    settings: Settings, local_embedder: LocalEmbedder, tmp_path: Path
) -> None:
    valkey = start_valkey(tmp_path / "bounded")  # bounded, volatile-lru, as rag-serve runs it
    settings = settings.model_copy(update={"redis_url": valkey.url})
    client = aioredis.from_url(valkey.url)
    try:
        await seed(settings, local_embedder)
        key = await make_key(settings, "query", tokens_per_day=900)  # room for one reservation, not two
        async with running(settings, local_embedder, key=key) as http:
            first = await ask(http)
            assert first.status == 200 and first.meta["cache"] == "miss"
            spent = await charged(valkey.url, key)
            assert 0 < spent <= 900

            assert await fill_until_evicting(client) >= 20_000
            assert await charged(valkey.url, key) == spent  # the spend was not evicted

            over = await ask(http, "Which library parses PDF files?")
            assert over.status == 429 and over.body["error"]["code"] == "token_budget_exceeded"
    finally:
        await client.aclose()
        valkey.stop()


async def test_every_cap_survives_eviction(tmp_path: Path) -> None:
    valkey = start_valkey(tmp_path)
    client = aioredis.from_url(valkey.url)
    try:
        limiter = Limiter(client, auth_failures_per_minute=3)
        caller = Caller("evictee", rpm=1, tokens_per_day=1000, max_inflight=1)
        await limiter.check_request(caller)  # the minute's one request
        assert await limiter.occupy_slot(caller, "first")  # the one answer in flight
        await limiter.reserve_tokens(caller, 600)  # most of the day's tokens
        for _ in range(3):
            await limiter.record_auth_failure("10.0.0.9")  # all the failures allowed this minute
        caps = [k async for k in client.scan_iter(match=KEYS.family("limit"))]
        assert len(caps) == 4 and all([await client.ttl(k) == -1 for k in caps])  # none is evictable

        await fill_until_evicting(client)
        assert sorted([k async for k in client.scan_iter(match=KEYS.family("limit"))]) == sorted(caps)

        with pytest.raises(RateLimited) as rate:
            await limiter.check_request(caller)
        assert rate.value.code == "rate_limited"
        with pytest.raises(RateLimited) as inflight:
            await limiter.occupy_slot(caller, "second")
        assert inflight.value.code == "too_many_inflight"
        with pytest.raises(BudgetExceeded):
            await limiter.reserve_tokens(caller, 600)
        assert await client.hget(KEYS.auth_failures, "10.0.0.9") == b"3"
        now, _ = await client.time()
        if int(await client.hget(KEYS.auth_failures, "#window") or -1) == now // 60:  # still the same minute
            with pytest.raises(RateLimited) as auth:
                await limiter.record_auth_failure("10.0.0.9")
            assert auth.value.code == "too_many_auth_failures"
    finally:
        await client.aclose()
        valkey.stop()


async def test_a_budget_is_one_hash_per_key_that_a_new_day_resets(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        limiter = Limiter(client)
        caller = Caller(uuid.uuid4().hex[:12], tokens_per_day=1000)
        budget = KEYS.token_budget(caller.key_id)

        yesterday = await limiter.reserve_tokens(caller, 600, now=NOW)
        with pytest.raises(BudgetExceeded):
            await limiter.reserve_tokens(caller, 600, now=NOW + 60)
        today = await limiter.reserve_tokens(caller, 600, now=NOW + DAY)  # a new day: a fresh budget
        assert today.day == utc_day(NOW + DAY)
        # A worker whose clock is still on yesterday charges today, and does not reset it.
        late = await limiter.reserve_tokens(caller, 300, now=NOW + DAY - 1)
        assert late.day == today.day
        await yesterday.settle(100)  # yesterday is over: giving back its tokens changes nothing today
        assert await client.hmget(budget, ["day", "used"]) == [today.day.encode(), b"900"]
        await today.settle(100)
        assert await client.hget(budget, "used") == b"400"
        await limiter.check_tokens(caller, now=NOW + DAY)  # 400 of 1000: not used up

        for day in range(2, 12):  # days go by: still one key, without a TTL
            await limiter.reserve_tokens(caller, 10, now=NOW + day * DAY)
        assert [k async for k in client.scan_iter(match=f"{budget}*")] == [budget.encode()]
        assert await client.ttl(budget) == -1
    finally:
        await client.aclose()


async def test_an_upgrade_keeps_the_days_spend_counted_before_the_hash(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        limiter = Limiter(client)
        caller = Caller(uuid.uuid4().hex[:12], tokens_per_day=1000)
        # What the previous version wrote for this day: a counter per day, with a TTL.
        await client.set(KEYS.token_budget_by_day(caller.key_id, utc_day(NOW)), 950, ex=3600)
        with pytest.raises(BudgetExceeded):
            await limiter.reserve_tokens(caller, 100, now=NOW)
        assert (await limiter.reserve_tokens(caller, 50, now=NOW)).reserved == 50
        assert await client.hget(KEYS.token_budget(caller.key_id), "used") == b"1000"
        with pytest.raises(BudgetExceeded):
            await limiter.check_tokens(caller, now=NOW)
    finally:
        await client.aclose()
