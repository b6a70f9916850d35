"""Coalesced misses in one app: followers keep their answer when the leader's client hangs up."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from service.embeddings.encoders import LocalEmbedder
from service.settings import Settings
from tests.support.answers import FLUSH, ask, followers_joined, running, seed, with_providers
from tests.support.provider_server import Behavior, ProviderServer
from tests.support.servers import wait_until
from tests.support.sse import aiter_sse


async def test_leader_client_leaving_keeps_the_answer_going_for_followers(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    settings = with_providers(settings, provider)
    await seed(settings, local_embedder)
    answer = " ".join(f"t{i}" for i in range(30)) + " [1]"
    provider.default = Behavior(text=answer, first_token_delay=0.5, token_interval=0.05)
    async with running(settings, local_embedder) as http:
        client = aioredis.from_url(str(settings.redis_url))

        async def leader_hangs_up_after_first_token() -> None:
            async with http.stream("POST", "/rag/stream", json={"question": FLUSH}) as response:
                async for name, _ in aiter_sse(response.aiter_lines()):
                    if name == "token":
                        return

        leader = asyncio.create_task(leader_hangs_up_after_first_token())
        await provider.async_wait_for(lambda: len(provider.calls) == 1, timeout=10)
        followers = [asyncio.create_task(ask(http)) for _ in range(3)]
        await wait_until(lambda: followers_joined(client, 3), within=10)
        await leader
        replies = await asyncio.gather(*followers)
        assert all(r.meta["cache"] == "coalesced" and r.text == answer and r.names[-1] == "done" for r in replies)
        assert len(provider.calls_to("messages")) == 1 and provider.calls_to("messages")[0].completed
        assert (await ask(http)).meta["cache"] == "hit"  # the shared answer was complete, so it was cached
        await client.aclose()
