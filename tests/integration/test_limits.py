"""Rate limits and budgets through the served app, on the real Valkey: per key, across workers,
hits free of token budgets, failed-auth limits per address, and failing open without Redis."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from service.answer.budgeting import in_flight
from service.answer.events import Event, Token
from service.embeddings.encoders import LocalEmbedder
from service.http.app import create_app
from service.http.auth import Principal
from service.redis.keyspace import KEYS
from service.redis.limits import Limiter, TokenBudget
from service.settings import Settings
from tests.support.answers import FLUSH, ask, running, seed
from tests.support.proxy import ReplyHoldingProxy
from tests.support.servers import bearer, make_key, serve_app, wait_until


async def test_requests_per_minute_are_per_key_and_shared_by_workers(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    await seed(settings, local_embedder)
    limited, other = await make_key(settings, "query", rpm=4), await make_key(settings, "query")
    # Two app instances with their own Redis clients and scripts: two workers sharing one Valkey.
    async with (
        serve_app(create_app(settings, embedder=local_embedder)) as one,
        serve_app(create_app(settings, embedder=local_embedder)) as two,
        httpx.AsyncClient(headers=bearer(limited), timeout=30) as http,
    ):
        statuses = [
            (await http.post(f"{url}/rag/answer", json={"question": FLUSH})).status_code for url in [one, two] * 2
        ]
        assert statuses == [200, 200, 200, 200]  # a burst up to the per-minute limit, hits included
        over = await http.post(f"{two}/rag/stream", json={"question": FLUSH})
        assert over.status_code == 429
        assert (
            over.json()["error"]["code"] == "rate_limited"
            and "4 requests per minute" in over.json()["error"]["message"]
        )
        assert 1 <= int(over.headers["retry-after"]) <= 15  # one request's worth of the minute
        assert over.headers["x-request-id"]
        # another key has its own allowance
        assert (
            await http.post(f"{one}/rag/answer", json={"question": FLUSH}, headers=bearer(other))
        ).status_code == 200


async def test_token_budget_charges_generated_answers_only(settings: Settings, local_embedder: LocalEmbedder) -> None:
    await seed(settings, local_embedder)
    # Room for one reservation (prompt + max_tokens 512), not for two.
    key = await make_key(settings, "query", tokens_per_day=900)
    async with running(settings, local_embedder, key=key) as http:
        first = await ask(http)  # a miss: generated, charged what it really used
        assert first.status == 200 and first.meta["cache"] == "miss"
        spent = sum(first.of("done")[0]["usage"][k] for k in ("input_tokens", "output_tokens"))
        assert 0 < spent <= 900
        assert (await ask(http)).meta["cache"] == "hit"  # hits are free, even over budget
        assert (await ask(http, "how can i flush the cache")).meta["cache"] == "semantic_hit"  # so are semantic hits
        over = await ask(http, "Which library parses PDF files?")
        assert over.status == 429 and over.body["error"]["code"] == "token_budget_exceeded"
        assert 1 <= int(over.headers["retry-after"]) <= 86_400
        bypass = await ask(http, cache="bypass")  # bypass generates: it is charged and refused
        assert bypass.status == 429
        # the budget is the key's: a fresh key still gets answers generated
        fresh = await ask(http, "Which library parses PDF files?", headers=bearer(await make_key(settings, "query")))
        assert fresh.status == 200 and fresh.meta["cache"] == "miss"


async def test_failed_auth_is_limited_per_address(settings: Settings, local_embedder: LocalEmbedder) -> None:
    settings = settings.model_copy(update={"auth_failures_per_minute": 3})
    await seed(settings, local_embedder)
    good = await make_key(settings, "query")
    async with running(settings, local_embedder, key=good) as http:
        assert (await ask(http)).status == 200  # the good key is now known to this worker
        bad = bearer("rck_abcdefghijkl_" + "x" * 43)
        statuses = [
            (await http.post("/rag/answer", json={"question": FLUSH}, headers=bad)).status_code for _ in range(5)
        ]
        assert statuses == [401, 401, 401, 429, 429]
        blocked = await http.post("/rag/answer", json={"question": FLUSH}, headers=bad)
        assert blocked.json()["error"]["code"] == "too_many_auth_failures"
        assert 1 <= int(blocked.headers["retry-after"]) <= 60
        # a key this worker already verified is not held up by someone else's guessing
        assert (await ask(http)).status == 200
        # nor is a valid key it must look up in Postgres (issue 12: a valid key is never blocked)
        unseen = await ask(http, headers=bearer(await make_key(settings, "query")))
        assert unseen.status == 200


async def test_limits_fail_open_without_redis(settings: Settings, local_embedder: LocalEmbedder) -> None:
    await seed(settings, local_embedder)
    key = await make_key(settings, "query", rpm=1, tokens_per_day=1)
    settings = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    async with running(settings, local_embedder, key=key) as http:
        ready = (await http.get("/ready")).json()
        assert ready["status"] == "degraded" and ready["checks"]["limits"] == {"ok": False, "mode": "fail_open"}
        for _ in range(3):  # over both limits, yet answered: nobody is limited while Redis is away
            reply = await ask(http)
            assert reply.status == 200 and reply.meta["cache"] == "miss"
        wrong = bearer("rck_abcdefghijkl_" + "x" * 43)
        assert (await http.post("/rag/answer", json={"question": FLUSH}, headers=wrong)).status_code == 401


async def test_a_limit_failing_open_says_so_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    client = aioredis.from_url("redis://127.0.0.1:1/0")  # nothing listens there
    limiter = Limiter(client)
    try:
        with caplog.at_level(logging.WARNING):
            await limiter.check_request(Principal("k", "k", ("query",), rpm=1, tokens_per_day=None))
    finally:
        await client.aclose()
    assert not limiter.enforcing
    assert [r.getMessage() for r in caplog.records] == [
        "redis unavailable, limits fail open for 2s (rate limit not checked: ConnectionError)"
    ]


async def test_ready_reports_enforced_limits(settings: Settings, local_embedder: LocalEmbedder) -> None:
    async with running(settings, local_embedder) as http:
        checks = (await http.get("/ready")).json()["checks"]
        assert checks["limits"] == {"ok": True, "mode": "enforced"}


async def test_a_request_cancelled_while_taking_its_in_flight_slot_gives_it_back(redis_url: str) -> None:
    # Review: the slot was recorded only once the script's reply came back, and taken outside the
    # `try` that vacates it: a client hanging up in between left the slot held until it lapsed.
    direct = aioredis.from_url(redis_url)
    caller = Principal(uuid.uuid4().hex, "k", ("query",), rpm=None, tokens_per_day=None, max_inflight=1)
    slots = KEYS.inflight_slots(caller.key_id)

    async def produce(look_again: bool) -> AsyncIterator[Event]:
        yield Token("x")

    async with ReplyHoldingProxy(redis_url).running() as proxy:
        proxied = aioredis.from_url(proxy.url)
        limiter = Limiter(proxied, inflight_lapse_s=150)
        warm = TokenBudget(limiter, caller)  # connects and loads the script, with replies flowing
        await warm.occupy()
        await warm.vacate()
        budget = TokenBudget(limiter, caller)

        async def consume() -> None:
            async for _ in in_flight(budget, produce, False):
                pass

        proxy.hold()
        task = asyncio.create_task(consume())

        async def taken() -> bool:  # the script ran; its reply waits in the proxy
            return int(await direct.zcard(slots)) == 1

        await wait_until(taken, within=10)
        task.cancel()  # the client hangs up while the slot is being taken
        proxy.release()
        await asyncio.gather(task, return_exceptions=True)
        assert int(await direct.zcard(slots)) == 0
        await proxied.aclose()
    await direct.aclose()


async def test_an_in_flight_slot_whose_reply_was_lost_is_given_back(redis_url: str) -> None:
    # Review: the script ran but its reply missed the socket timeout; the limiter failed open with
    # "nothing taken", so the slot was never given back and the key got 429s until it lapsed.
    direct = aioredis.from_url(redis_url)
    caller = Principal(uuid.uuid4().hex, "k", ("query",), rpm=None, tokens_per_day=None, max_inflight=1)
    slots = KEYS.inflight_slots(caller.key_id)

    async with ReplyHoldingProxy(redis_url).running() as proxy:

        async def produce(look_again: bool) -> AsyncIterator[Event]:
            proxy.release()  # the stall is over by the time the answer runs
            yield Token("x")

        proxied = aioredis.from_url(proxy.url, socket_timeout=0.5)
        limiter = Limiter(proxied, inflight_lapse_s=150)
        warm = TokenBudget(limiter, caller)  # connects and loads the script, with replies flowing
        await warm.occupy()
        await warm.vacate()
        budget = TokenBudget(limiter, caller)
        proxy.hold()  # the slot script's reply is lost to the client's timeout; the script still runs
        events = [event async for event in in_flight(budget, produce, False)]
        assert events == [Token("x")]  # not checked: the answer went on (fail open)
        assert int(await direct.zcard(slots)) == 0  # and the slot its script took was given back
        await proxied.aclose()
    await direct.aclose()
