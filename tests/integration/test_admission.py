"""Admission control through HTTP (issue 11, tests 4 and 5): a burst of distinct misses is either
answered or refused with 503 `overloaded` + Retry-After within the wait budget, a quiet key's
miss is admitted ahead of a noisy key's backlog, and exact hits never queue.

The work inside an admission slot (embedding, retrieval) is held up deterministically by a
lock on the `chunks` table taken from another connection, so the gate's queue fills while the
test watches it; the lock is then released and the order in which the loopback provider was
called is the order the gate admitted the misses. No assertion depends on how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import httpx
import redis.asyncio as aioredis
from fastapi import FastAPI

from service.answer.admission import AdmissionGate
from service.embeddings.encoders import LocalEmbedder
from service.http.app import create_app
from service.http.auth import parse_key
from service.observability.logs import ACCESS_LOGGER
from service.redis.keyspace import KEYS
from service.redis.limits import utc_day
from service.settings import Settings
from tests.support.answers import Reply, ask, followers_joined, seed, with_providers
from tests.support.log_capture import capturing
from tests.support.provider_server import Behavior, ProviderServer
from tests.support.servers import bearer, make_key, serve_app, wait_until


@asynccontextmanager
async def chunks_locked(settings: Settings) -> AsyncIterator[None]:
    """Retrieval blocks (in Postgres) until the block ends."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE chunks IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


def gate(app: FastAPI) -> AdmissionGate:
    admission: AdmissionGate = app.state.resources.answers.admission
    return admission


def configured(settings: Settings, provider: ProviderServer, **admission: float) -> Settings:
    provider.default = Behavior(first_token_delay=0.2)  # a slow model: it must not hold a slot
    # No semantic cache: every distinct question here is a miss, whatever the judge thinks of it.
    return with_providers(settings, provider, semantic_cache=False, db_statement_timeout_s=120, **admission)


def called_for(provider: ProviderServer, question: str) -> int:
    """The position (from 0) of the first provider call whose prompt carries `question`."""
    return next(i for i, call in enumerate(provider.calls) if question in json.dumps(call.body))


async def test_a_quiet_keys_miss_is_admitted_before_a_noisy_keys_backlog(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    settings = configured(settings, provider, admission_slots=1, admission_queue=100, admission_wait_s=120)
    await seed(settings, local_embedder)
    noisy, victim = bearer(await make_key(settings, "query")), bearer(await make_key(settings, "query"))
    noisy_questions = [f"Noisy question {i}: how is the cache flushed?" for i in range(10)]
    victim_question = "Victim question: which library parses PDF files?"
    app = create_app(settings, embedder=local_embedder)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=180) as http:
        async with chunks_locked(settings):
            backlog = [asyncio.create_task(ask(http, q, headers=noisy)) for q in noisy_questions]
            await wait_until(lambda: gate(app).waiting == 9, within=60)  # one in its slot, blocked on the lock
            quiet = asyncio.create_task(ask(http, victim_question, headers=victim))
            await wait_until(lambda: gate(app).waiting == 10, within=60)
        replies = await asyncio.gather(*backlog, quiet)
    assert [r.status for r in replies] == [200] * 11
    assert all(r.meta["cache"] == "miss" and r.names[-1] == "done" for r in replies)
    # Round-robin by key: the victim waits for the noisy key's turn (its first and at most one
    # more miss), never for its whole backlog of nine.
    assert called_for(provider, victim_question) <= 2
    assert len(provider.calls) == 11


async def test_a_burst_of_misses_is_answered_or_refused_with_retry_after_and_hits_never_queue(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    slots, queue, wait_s = 2, 16, 2.0
    settings = configured(settings, provider, admission_slots=slots, admission_queue=queue, admission_wait_s=wait_s)
    await seed(settings, local_embedder)
    keys = [bearer(await make_key(settings, "query")) for _ in range(3)]
    admin = bearer(await make_key(settings, "admin"))
    app = create_app(settings, embedder=local_embedder)
    with capturing() as logs:
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=180) as http:
            cached = await ask(http, "How do I flush the cache?", headers=keys[0])
            assert cached.status == 200 and cached.meta["cache"] == "miss"
            async with chunks_locked(settings):
                burst = [
                    asyncio.create_task(ask(http, f"Burst question {i} from key {i % 3}?", headers=keys[i % 3]))
                    for i in range(60)
                ]
                refused = lambda: sum(t.done() for t in burst) >= 60 - slots - queue  # noqa: E731
                await wait_until(refused, within=60)  # the queue is full: the rest were refused at once
                # While every slot is stuck and the queue is full, an exact hit is served at once.
                hit = await ask(http, "How do I flush the cache?", headers=keys[1])
                assert hit.status == 200 and hit.meta["cache"] == "hit"
            replies: list[Reply] = await asyncio.gather(*burst)
            metrics = (await http.get("/metrics", headers=admin)).text
    answered = [r for r in replies if r.status == 200]
    shed = [r for r in replies if r.status != 200]
    assert all(r.meta["cache"] == "miss" and r.names[-1] == "done" for r in answered)
    assert all(r.status == 503 and r.body["error"]["code"] == "overloaded" for r in shed)
    assert all(int(r.headers["retry-after"]) >= 1 for r in shed)
    assert len(shed) >= 60 - slots - queue and len(answered) >= slots  # the two in their slots finish
    assert len(provider.calls) == 1 + len(answered)  # a refused miss never reached the provider
    # Every miss of the burst passed through the gate and none waited past the wait budget
    # (the histogram's 5 s bucket: the 2 s budget plus room for a busy event loop).
    waits = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("ragcache_admission_wait_seconds_")
    }
    assert waits["ragcache_admission_wait_seconds_count"] == 61
    assert waits['ragcache_admission_wait_seconds_bucket{le="5.0"}'] == 61
    failures = {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in metrics.splitlines() if "failures" in line}
    assert failures['ragcache_request_failures_total{code="overloaded",stage="admission"}'] == str(float(len(shed)))
    # The access line says how long each miss waited for its slot; the hit never asked for one.
    access = {
        line["request_id"]: line
        for line in map(json.loads, logs.getvalue().splitlines())
        if line["logger"] == ACCESS_LOGGER and "request_id" in line
    }
    assert "admission_wait_ms" not in access[hit.headers["x-request-id"]]
    assert all(access[r.headers["x-request-id"]]["admission_wait_ms"] >= 0 for r in [cached, *replies])


async def test_a_key_out_of_tokens_looks_for_a_semantic_hit_only_through_the_gate(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    """A review found a spent key's semantic lookup (an embedding, a vector search) running outside
    the gate: with the gate full it now gets its 429 at once; with a free slot, its free semantic hit."""
    await seed(settings, local_embedder)
    spent = await make_key(settings, "query", tokens_per_day=1000)
    app = create_app(
        settings.model_copy(update={"admission_slots": 1, "admission_wait_s": 0.2}), embedder=local_embedder
    )
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        other = bearer(await make_key(settings, "query"))
        assert (await ask(http, headers=other)).meta["cache"] == "miss"  # cached, and in the semantic index
        parsed = parse_key(spent)
        assert parsed is not None
        client = aioredis.from_url(str(settings.redis_url))
        await client.hset(KEYS.token_budget(parsed[0]), mapping={"day": utc_day(time.time()), "used": 1000})  # spent
        await client.aclose()
        paraphrase = "how can i flush the cache"
        async with gate(app).slot("someone else"):  # the only slot is taken
            refused = await ask(http, paraphrase, headers=bearer(spent))
        assert refused.status == 429 and refused.body["error"]["code"] == "token_budget_exceeded"
        served = await ask(http, paraphrase, headers=bearer(spent))
        assert served.status == 200 and served.meta["cache"] == "semantic_hit"


async def test_a_leader_refused_by_the_gate_hands_its_answer_to_a_follower_of_another_key(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    """A review found a leader's admission refusal passed on to its followers as a 503, though the
    queue is fair by key and it was not their turn that ran out: a follower now takes the answer over."""
    await seed(settings, local_embedder)
    one_slot = settings.model_copy(update={"admission_slots": 1, "admission_wait_s": 2.0})
    app = create_app(one_slot, embedder=local_embedder)
    noisy, quiet = bearer(await make_key(settings, "query")), bearer(await make_key(settings, "query"))
    client = aioredis.from_url(str(settings.redis_url))
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        admission = gate(app)
        async with admission.slot("someone else"):  # the only slot is taken while both ask
            leader = asyncio.create_task(ask(http, headers=noisy))
            await wait_until(lambda: admission.waiting == 1)  # the leader queues for its turn
            follower = asyncio.create_task(ask(http, headers=quiet))
            await wait_until(lambda: followers_joined(client, 1))
            refused = await leader  # its wait budget ran out
        assert refused.status == 503 and refused.body["error"]["code"] == "overloaded"
        answered = await follower
        assert answered.status == 200 and answered.meta["cache"] == "miss", answered.body
    await client.aclose()
