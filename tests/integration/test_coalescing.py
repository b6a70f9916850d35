"""Coalesced misses in one app: followers keep their answer when the leader's client hangs up."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from service.embeddings.encoders import LocalEmbedder
from service.settings import Settings
from tests.support.answers import SLOW_ANSWER, ask, followers_joined, hang_up_after_first_token, running, seeded_slow
from tests.support.provider_server import ProviderServer
from tests.support.servers import wait_until


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
