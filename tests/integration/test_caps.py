"""Caps that hold under load (issue 11), through HTTP against the real servers with small pools:
rate limits that a busy request pool cannot make fail open, coalescing that a busy pool cannot
turn off, token budgets reserved before generating and settled by the generation itself (even
when the client leaves), and a per-key cap on answers in flight."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from service.cli.admin import app as admin_app
from service.embeddings.encoders import LocalEmbedder
from service.http.app import Resources, create_app
from service.http.auth import KeyStore, parse_key
from service.postgres.corpus import open_corpus
from service.settings import Settings
from tests.support.answers import (
    FLUSH,
    SLOW_ANSWER,
    Reply,
    ask,
    charged,
    followers_joined,
    hang_up_after_first_token,
    running,
    seed,
    seeded_slow,
    with_providers,
)
from tests.support.log_capture import capturing
from tests.support.provider_server import Behavior, CallRecord, ProviderServer
from tests.support.servers import bearer, cli_env, make_key, serve_app, wait_until

PDF = "Which library parses PDF files?"
FAIL_OPEN = "fail open"


def asked(call: CallRecord, question: str) -> bool:
    return question in json.dumps(call.body)


@contextmanager
def logs() -> Iterator[list[str]]:
    """The log lines written meanwhile (as `rag-serve` writes them), available after the block."""
    lines: list[str] = []
    with capturing() as stream:
        yield lines
    lines.extend(stream.getvalue().splitlines())


# -- (1) pool pressure -------------------------------------------------------------------------


async def test_busy_request_pool_neither_fails_limits_open_nor_turns_coalescing_off(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    # A small request pool, as on a busy worker: on main, 69 followers blocking in XREAD on it
    # made the rate limit fail open, and the cache and coalescing take pool timeouts for "Redis down".
    settings = with_providers(settings, provider, redis_max_connections=16)
    await seed(settings, local_embedder)
    provider.default = Behavior(first_token_delay=3.0, token_interval=0.02)
    unlimited, limited = await make_key(settings, "query"), await make_key(settings, "query", rpm=10)
    with logs() as lines:
        async with running(settings, local_embedder, key=unlimited) as http:
            slow = [asyncio.create_task(ask(http, f"Tell me about ingest topic number {i}")) for i in range(15)]
            same = [asyncio.create_task(ask(http, PDF)) for _ in range(70)]
            await provider.async_wait_for(lambda: len(provider.calls) >= 16, timeout=60)
            started = time.monotonic()
            limited_replies = await asyncio.gather(*(ask(http, FLUSH, headers=bearer(limited)) for _ in range(25)))
            elapsed = time.monotonic() - started
            same_replies = await asyncio.gather(*same)
            await asyncio.gather(*slow)
            again = await ask(http, PDF)
    answered = [r for r in limited_replies if r.status == 200]
    refused = [r for r in limited_replies if r.status == 429]
    assert len(answered) + len(refused) == 25
    assert all(r.body["error"]["code"] == "rate_limited" for r in refused)
    # 10 at once, then one every 6 s: exactly the rpm, unless the burst itself took that long.
    assert 10 <= len(answered) <= 10 + int(elapsed / 6)
    assert [r.status for r in same_replies] == [200] * 70
    assert all(r.names[-1] == "done" for r in same_replies)
    assert sorted({r.meta["cache"] for r in same_replies}) in (["coalesced", "miss"], ["coalesced", "hit", "miss"])
    assert len([c for c in provider.calls if asked(c, PDF)]) == 1  # one generation for 70 questions
    assert again.meta["cache"] == "hit"  # and it was cached
    assert not [line for line in lines if FAIL_OPEN in line]
    assert not [line for line in lines if "not caching" in line]


# -- (2), (3) reserved budgets -------------------------------------------------------------------


async def test_concurrent_misses_never_charge_more_than_the_budget(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    settings = with_providers(settings, provider)
    await seed(settings, local_embedder)
    provider.default = Behavior(first_token_delay=0.5, token_interval=0.01)
    tiny = await make_key(settings, "query", tokens_per_day=100)
    some = await make_key(settings, "query", tokens_per_day=1000)
    async with running(settings, local_embedder, key=tiny) as http:
        # max_tokens 8192 can never fit a budget of 100: each is refused before any generation.
        replies = await asyncio.gather(*(ask(http, f"{PDF} ({i})", max_tokens=8192) for i in range(8)))
        assert [r.status for r in replies] == [429] * 8
        assert {r.body["error"]["code"] for r in replies} == {"token_budget_exceeded"}
        assert await charged(str(settings.redis_url), tiny) <= 100
        assert not provider.calls
        # A budget with room for one or two reservations of prompt + 300: never more than that.
        replies = await asyncio.gather(
            *(ask(http, f"{PDF} ({i})", max_tokens=300, headers=bearer(some)) for i in range(8))
        )
    answered = [r for r in replies if r.status == 200]
    assert 1 <= len(answered) <= 2
    assert all(r.body["error"]["code"] == "token_budget_exceeded" for r in replies if r.status != 200)
    usage = [r.of("done")[0]["usage"] for r in answered]
    spent = sum(u["input_tokens"] + u["output_tokens"] for u in usage)
    assert await charged(str(settings.redis_url), some) == spent <= 1000  # settled to the real usage


async def test_a_client_that_leaves_after_the_first_token_is_charged(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    settings = with_providers(settings, provider)
    await seed(settings, local_embedder)
    provider.default = Behavior(text=" ".join(f"w{i}" for i in range(200)), token_interval=0.05)
    key = await make_key(settings, "query", tokens_per_day=100_000)
    async with running(settings, local_embedder, key=key) as http:
        await hang_up_after_first_token(http, FLUSH)
        # Nobody follows, so the generation is cancelled and charged what it produced: the prompt
        # and the tokens streamed, not the whole reservation (prompt + 512).
        await provider.async_wait_for(lambda: provider.calls[0].disconnected, timeout=10)
        await wait_until(lambda: charged(str(settings.redis_url), key), within=10)
        spent = await charged(str(settings.redis_url), key)
        assert provider.calls[0].tokens_sent < 200
        assert 0 < spent < 100_000


async def test_a_leader_that_leaves_with_a_follower_attached_is_still_charged(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    settings = await seeded_slow(settings, local_embedder, provider)
    leader_key = await make_key(settings, "query", tokens_per_day=100_000)
    follower_key = await make_key(settings, "query")
    async with running(settings, local_embedder, key=leader_key) as http:
        client = aioredis.from_url(str(settings.redis_url))
        leader = asyncio.create_task(hang_up_after_first_token(http, FLUSH))
        await provider.async_wait_for(lambda: len(provider.calls) == 1, timeout=10)
        follower = asyncio.create_task(ask(http, headers=bearer(follower_key)))
        await wait_until(lambda: followers_joined(client, 1), within=10)
        await leader
        reply: Reply = await follower
        await client.aclose()
        assert reply.meta["cache"] == "coalesced" and reply.text == SLOW_ANSWER
        saved = reply.of("done")[0]["saved"]  # what the leader's generation cost
        full = int(saved["input_tokens"]) + int(saved["output_tokens"])

        # The whole answer was generated for the follower: the leader's key pays all of it.
        async def fully_charged() -> bool:
            return await charged(str(settings.redis_url), leader_key) == full

        await wait_until(fully_charged, within=10)


# -- per-key concurrency ---------------------------------------------------------------------------


async def test_a_key_gets_its_answers_in_flight_and_429_beyond(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    # A key cache TTL of an hour: only the NOTIFY can bring the raised cap to the running worker.
    settings = with_providers(settings, provider, auth_cache_ttl_s=3600)
    await seed(settings, local_embedder)
    key = await make_key(settings, "query", max_inflight=2)
    other = await make_key(settings, "query", max_inflight=2)
    parsed = parse_key(key)
    assert parsed is not None
    async with running(settings, local_embedder, key=key) as http:
        assert (await ask(http, FLUSH)).meta["cache"] == "miss"  # cached for later
        provider.enqueue(Behavior(first_token_delay=8.0), Behavior(first_token_delay=8.0))
        held = [asyncio.create_task(ask(http, f"{PDF} ({i})")) for i in range(2)]
        await provider.async_wait_for(lambda: len(provider.calls) == 3, timeout=30)
        over = await ask(http, f"{PDF} (over)")
        assert over.status == 429 and over.body["error"]["code"] == "too_many_inflight"
        assert over.headers["retry-after"] == "1"
        assert (await ask(http, FLUSH)).meta["cache"] == "hit"  # hits take no slot
        assert (await ask(http, f"{PDF} (other)", headers=bearer(other))).status == 200  # slots are per key

        async with open_corpus(settings) as corpus:
            updated = await KeyStore(corpus.pool).update(parsed[0], {"max_inflight": 3})
        assert updated is not None and updated.max_inflight == 3

        async def third_admitted() -> bool:
            reply = await ask(http, f"{PDF} (third)")
            assert reply.status in (200, 429), reply.body
            return reply.status == 200

        await wait_until(third_admitted, within=6, interval=0.05)
        assert not any(task.done() for task in held)  # admitted beside the two, not after them
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200]


# -- a busy pool is not Redis down ------------------------------------------------------------------


async def test_a_busy_limits_pool_is_back_pressure_and_an_unreachable_redis_fails_open(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    await seed(settings, local_embedder)
    key = await make_key(settings, "query", rpm=100)
    busy = settings.model_copy(update={"redis_limit_connections": 1})
    app = create_app(busy, embedder=local_embedder)
    with logs() as lines:
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30, headers=bearer(key)) as http:
            assert (await ask(http)).status == 200
            resources: Resources = app.state.resources
            pool = resources.pools.limits.connection_pool
            held = await pool.get_connection()  # type: ignore[no-untyped-call]  # its only connection
            try:
                reply = await ask(http)
                assert reply.status == 503 and reply.body["error"]["code"] == "overloaded"
                assert reply.headers["retry-after"] == "1"
                ready = (await http.get("/ready")).json()
                assert ready["status"] == "ready" and ready["checks"]["redis"]["busy"] is True
            finally:
                await pool.release(held)
            assert (await ask(http)).status == 200  # and the cache stayed on
    assert not [line for line in lines if FAIL_OPEN in line or "redis unavailable" in line]

    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with logs() as lines:
        async with running(down, local_embedder, key=key) as http:
            assert (await ask(http)).status == 200
            assert (await http.get("/ready")).json()["status"] == "degraded"
    assert [line for line in lines if FAIL_OPEN in line]


# -- rag-admin ---------------------------------------------------------------------------------------


def test_rag_admin_sets_and_updates_a_keys_max_inflight(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in cli_env(settings, RAG_DEFAULT_MAX_INFLIGHT="3").items():
        monkeypatch.setenv(name, value)
    cli = CliRunner()
    default = json.loads(cli.invoke(admin_app, ["keys", "create", "--name", "bot", "--json"]).stdout)
    assert default["max_inflight"] == 3  # RAG_DEFAULT_MAX_INFLIGHT for new keys
    chosen = json.loads(
        cli.invoke(admin_app, ["keys", "create", "--name", "etl", "--max-inflight", "9", "--json"]).stdout
    )
    assert chosen["max_inflight"] == 9

    raised = cli.invoke(admin_app, ["keys", "update", default["id"], "--max-inflight", "12", "--json"])
    assert raised.exit_code == 0, raised.output
    assert json.loads(raised.stdout)["max_inflight"] == 12
    lifted = cli.invoke(admin_app, ["keys", "update", chosen["key"], "--max-inflight", "0"])  # the whole key works too
    assert lifted.exit_code == 0 and "unlimited" in lifted.stdout
    listed = {
        r["name"]: r["max_inflight"] for r in json.loads(cli.invoke(admin_app, ["keys", "list", "--json"]).stdout)
    }
    assert listed == {"bot": 12, "etl": None}
    assert (
        "in flight" in cli.invoke(admin_app, ["keys", "list"], env={"COLUMNS": "200"}).stdout
    )  # a table as wide as a terminal

    nothing = cli.invoke(admin_app, ["keys", "update", default["id"]])
    assert nothing.exit_code == 2 and "nothing to update" in nothing.output
    unknown = cli.invoke(admin_app, ["keys", "update", "abcdefghijkl", "--max-inflight", "2"])
    assert unknown.exit_code == 1 and "no active key" in unknown.output
