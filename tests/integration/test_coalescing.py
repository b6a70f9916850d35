"""Coalesced misses in one app: followers keep their answer when the leader's client hangs up."""

from __future__ import annotations

import asyncio

import httpx
import redis.asyncio as aioredis

from service.embeddings.encoders import LocalEmbedder
from service.http.app import Resources, create_app
from service.settings import Settings
from tests.support.answers import (
    SLOW_ANSWER,
    ask,
    followers_joined,
    hang_up_after_first_token,
    running,
    seeded_slow,
)
from tests.support.provider_server import Behavior, ProviderServer
from tests.support.servers import bearer, make_key, serve_app, wait_until


async def test_leader_client_leaving_keeps_the_answer_going_for_followers(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    settings = await seeded_slow(settings, local_embedder, provider)
    async with running(settings, local_embedder) as http:
        client = aioredis.from_url(str(settings.redis_url))
        leader = asyncio.create_task(hang_up_after_first_token(http))
        await provider.async_wait_for(lambda: len(provider.calls) == 1, timeout=10)
        followers = [asyncio.create_task(ask(http)) for _ in range(3)]
        await wait_until(lambda: followers_joined(client, 3), within=10)
        await leader
        replies = await asyncio.gather(*followers)
        assert all(r.meta["cache"] == "coalesced" and r.text == SLOW_ANSWER and r.names[-1] == "done" for r in replies)
        assert len(provider.calls_to("messages")) == 1 and provider.calls_to("messages")[0].completed
        assert (await ask(http)).meta["cache"] == "hit"  # the shared answer was complete, so it was cached
        await client.aclose()


async def test_a_busy_request_pool_does_not_keep_the_leaders_events_from_its_followers(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    # Issue 11: leaders published their events through the request pool, so under a few hundred
    # streams publishing starved the cache, and a busy request pool dropped followers' events.
    settings = (await seeded_slow(settings, local_embedder, provider)).model_copy(update={"redis_max_connections": 2})
    provider.default = Behavior(text=SLOW_ANSWER, first_token_delay=2.0, token_interval=0.05)
    app = create_app(settings, embedder=local_embedder)
    key = await make_key(settings, "query")
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=60, headers=bearer(key)) as http:
        client = aioredis.from_url(str(settings.redis_url))
        leader = asyncio.create_task(ask(http))
        await provider.async_wait_for(lambda: len(provider.calls) == 1, timeout=10)
        follower = asyncio.create_task(ask(http))
        await wait_until(lambda: followers_joined(client, 1), within=10)
        resources: Resources = app.state.resources
        pool = resources.pools.requests.connection_pool
        # Every request-pool connection held while the whole answer streams (its first token is 2 s away).
        held = [await pool.get_connection() for _ in range(settings.redis_max_connections)]  # type: ignore[no-untyped-call]
        try:
            assert not provider.calls[0].completed  # the answer's events are all still to be published
            reply = await follower
        finally:
            for connection in held:
                await pool.release(connection)
        assert reply.status == 200 and reply.meta["cache"] == "coalesced"
        assert reply.text == SLOW_ANSWER and reply.names[-1] == "done"
        assert (await leader).text == SLOW_ANSWER
        assert len(provider.calls_to("messages")) == 1
        await client.aclose()


async def test_a_busy_publish_pool_delays_the_followers_events_but_loses_none(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    # A batch that found no connection free in time used to be dropped: followers got an answer with holes.
    settings = (await seeded_slow(settings, local_embedder, provider)).model_copy(
        update={"redis_publish_connections": 1}
    )
    provider.default = Behavior(text=SLOW_ANSWER, first_token_delay=0.5, token_interval=0.06)
    app = create_app(settings, embedder=local_embedder)
    key = await make_key(settings, "query")
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=60, headers=bearer(key)) as http:
        client = aioredis.from_url(str(settings.redis_url))
        resources: Resources = app.state.resources
        pool = resources.pools.publish.connection_pool
        held = await pool.get_connection()  # type: ignore[no-untyped-call]  # its only connection
        try:
            leader = asyncio.create_task(ask(http))
            await provider.async_wait_for(lambda: len(provider.calls) == 1, timeout=10)
            follower = asyncio.create_task(ask(http))
            await wait_until(lambda: followers_joined(client, 1), within=10)
            await provider.async_wait_for(lambda: provider.calls[0].completed, timeout=10)
        finally:
            await pool.release(held)
        reply = await follower
        assert reply.status == 200 and reply.meta["cache"] == "coalesced"
        assert reply.text == SLOW_ANSWER and reply.names[-1] == "done"
        assert (await leader).text == SLOW_ANSWER
        assert (await ask(http)).meta["cache"] == "hit"
        await client.aclose()
