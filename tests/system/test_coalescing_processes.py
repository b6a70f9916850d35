"""Coalesced misses across `rag-serve` processes sharing only Postgres and Redis: 50 for one call, a killed leader."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from service.embeddings.encoders import LocalEmbedder
from service.settings import Settings
from tests.support.answers import FLUSH, followers_joined, seed
from tests.support.processes import serve_process
from tests.support.provider_server import Behavior, ProviderServer
from tests.support.servers import BIN, bearer, cli_env, free_port, make_key, wait_until
from tests.support.sse import parse_sse


@asynccontextmanager
async def server_process(
    settings: Settings, provider: ProviderServer, log: Path, **env: str
) -> AsyncIterator[tuple[str, int]]:
    """`rag-serve` as its own OS process (a second worker that shares only Postgres and Redis)."""
    port = free_port()
    environment = cli_env(
        settings,
        ANTHROPIC_API_KEY="sk-ant-test",
        ANTHROPIC_BASE_URL=provider.base_url,
        RAG_PROVIDER_MAX_RETRIES="0",
        RAG_LOG_LEVEL="warning",
        **env,
    )
    async with serve_process(f"{BIN / 'rag-serve'} --port {port}", port, environment, log, log.parent) as served:
        yield served.url, served.pid


async def stream_answer(http: httpx.AsyncClient, url: str) -> list[tuple[str, dict[str, Any]]]:
    response = await http.post(f"{url}/rag/stream", json={"question": FLUSH}, timeout=60)
    assert response.status_code == 200, response.text
    return parse_sse(response.text)


def text_of(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(str(data["text"]) for name, data in events if name == "token")


async def test_fifty_identical_misses_across_two_processes_cost_one_call(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer, tmp_path: Path
) -> None:
    await seed(settings, local_embedder)
    auth = bearer(await make_key(settings, "query"))
    answer = " ".join(f"word{i}" for i in range(40)) + " [1]"
    provider.default = Behavior(text=answer, first_token_delay=1.5, token_interval=0.01)
    async with (
        server_process(settings, provider, tmp_path / "a.log") as (a, _),
        server_process(settings, provider, tmp_path / "b.log") as (b, _),
        httpx.AsyncClient(limits=httpx.Limits(max_connections=100), headers=auth) as http,
    ):
        replies = await asyncio.gather(*(stream_answer(http, a if i % 2 else b) for i in range(50)))
    assert len(provider.calls_to("messages")) == 1
    outcomes = [next(data["cache"] for name, data in r if name == "meta") for r in replies]
    # one leader; the rest followed it live, or (if the machine is slow) arrived after it finished
    assert outcomes.count("miss") == 1 and set(outcomes) <= {"miss", "coalesced", "hit"}
    assert outcomes.count("coalesced") >= 25
    assert all(text_of(r) == answer for r in replies)
    assert all(r[-1][0] == "done" for r in replies)
    done = [data for r in replies for name, data in r if name == "done"]
    assert sum(1 for d in done if d["usage"]["cost_usd"] == 0 and "saved" in d) == 49


async def test_killed_leader_process_does_not_strand_followers(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer, tmp_path: Path
) -> None:
    await seed(settings, local_embedder)
    auth = bearer(await make_key(settings, "query"))
    provider.enqueue(Behavior(hang=True))  # the leader's call never answers
    provider.default = Behavior(text="Taken over [1].")
    lease_env = {"RAG_COALESCE_LEASE_MS": "1500"}
    async with (
        server_process(settings, provider, tmp_path / "leader.log", **lease_env) as (leader_url, leader_pid),
        server_process(settings, provider, tmp_path / "follower.log", **lease_env) as (follower_url, _),
        httpx.AsyncClient(headers=auth) as http,
    ):
        leading = asyncio.create_task(http.post(f"{leader_url}/rag/stream", json={"question": FLUSH}))
        assert await provider.async_wait_for(lambda: len(provider.calls) == 1, timeout=30)
        followers = [asyncio.create_task(stream_answer(http, follower_url)) for _ in range(5)]
        client = aioredis.from_url(str(settings.redis_url))
        await wait_until(lambda: followers_joined(client, 5), within=20)
        os.kill(leader_pid, signal.SIGKILL)
        replies = await asyncio.wait_for(asyncio.gather(*followers), timeout=30)
        with pytest.raises(httpx.HTTPError):
            await leading
    assert all(r[-1][0] == "done" and text_of(r) == "Taken over [1]." for r in replies)
    assert len(provider.calls_to("messages")) == 2  # the dead leader's and exactly one takeover
    assert not [k async for k in client.scan_iter(match="ragcache:inflight:*")], "a lease outlived its leader"
    await client.aclose()
