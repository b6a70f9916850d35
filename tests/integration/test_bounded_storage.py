"""Bounded Redis memory that cannot break correctness (issue 11, docs/operations.md "Bounded
memory"): under `volatile-lru` Redis may evict a dependency set before the answers it lists;
such an answer must never be served again (a change of its documents could no longer find it),
and its semantic-cache row goes with it.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from service.embedded import start_valkey
from service.embeddings.encoders import LocalEmbedder
from service.redis.answer_cache import AnswerCache, CachedAnswer
from service.redis.keyspace import KEYS
from service.settings import Settings
from tests.support.answers import ask, running, seed


async def test_an_answer_whose_dependency_set_was_evicted_is_a_miss_and_leaves_the_semantic_index(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    await seed(settings, local_embedder)
    client = aioredis.from_url(str(settings.redis_url))
    db = await asyncpg.connect(settings.database_url)
    try:
        async with running(settings, local_embedder) as http:
            assert (await ask(http)).meta["cache"] == "miss"
            assert (await ask(http)).meta["cache"] == "hit"
            [answer_key] = [k.decode() async for k in client.scan_iter(match=KEYS.family("answer"))]
            key = answer_key.removeprefix(KEYS.answer(""))
            assert await db.fetchval("SELECT count(*) FROM semantic_cache WHERE key = $1", key) == 1
            deps = [k async for k in client.scan_iter(match=KEYS.family("deps"))]
            assert deps
            await client.delete(deps[0])  # what `volatile-lru` may do under memory pressure

            paraphrase = await ask(http, "how can i flush the cache")  # its semantic match is that answer
            assert paraphrase.status == 200 and paraphrase.meta["cache"] == "miss"
            assert await db.fetchval("SELECT count(*) FROM semantic_cache WHERE key = $1", key) == 0
            assert not await client.exists(answer_key)  # the unlisted answer was deleted, not kept
            again = await ask(http)  # generated afresh and cached with its dependencies again
            assert again.meta["cache"] in ("miss", "semantic_hit")
    finally:
        await db.close()
        await client.aclose()


def entry(document_id: int) -> CachedAnswer:
    return CachedAnswer("x" * 2000, {}, [], {}, [document_id], f"h{document_id}")


async def test_under_real_eviction_no_answer_outlives_the_invalidation_of_its_document(tmp_path: Path) -> None:
    valkey = start_valkey(tmp_path)  # configured as rag-serve runs it: bounded, volatile-lru
    client = aioredis.from_url(valkey.url)
    try:
        config = await client.config_get("maxmemory*")
        assert config["maxmemory"] == str(256 * 1024 * 1024) and config["maxmemory-policy"] == "volatile-lru"
        await client.config_set("maxmemory", "4mb")  # small enough to evict within a test
        cache = AnswerCache(client, ttl_s=3600)
        for i in range(4000):  # one document per answer: the sets are as cold as the answers
            await cache.put(f"k{i}", entry(i))
        assert int((await client.info("stats"))["evicted_keys"]) > 0
        orphans = 0
        for i in range(4000):
            has_answer = await client.exists(KEYS.answer(f"k{i}"))
            orphans += bool(has_answer and not await client.exists(KEYS.deps(i)))
        assert orphans > 0  # eviction did take sets whose answers stayed: the case that matters

        await cache.invalidate(range(4000))  # every document changed
        served = [i for i in range(4000) if await cache.get(f"k{i}") is not None]
        assert served == []
    finally:
        await client.aclose()
        valkey.stop()
