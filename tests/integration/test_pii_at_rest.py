"""Personal data never reaches storage (issue 12, finding 4): the review's question, with an SSN,
a phone number and a dotted card number, was kept verbatim in semantic_cache.question for 7 days."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from service.embeddings.encoders import LocalEmbedder
from service.settings import Settings
from tests.support.answers import ask, running, seed
from tests.support.servers import wait_until

SECRETS = ("078-05-1120", "5551234567", "4111.1111.1111.1111", "john.doe")
QUESTION = "My SSN is 078-05-1120, phone 5551234567, card 4111.1111.1111.1111, mail john.doe\uff20example.com: flush?"


async def _stored_questions(settings: Settings) -> list[str]:
    conn = await asyncpg.connect(str(settings.database_url))
    try:
        return [row["question"] for row in await conn.fetch("SELECT question FROM semantic_cache")]
    finally:
        await conn.close()


async def _redis_dump(settings: Settings) -> bytes:
    client: aioredis.Redis = aioredis.from_url(str(settings.redis_url), decode_responses=False)
    try:
        parts: list[Any] = []  # redis-py types replies as bytes | str; without decode_responses they are bytes
        async for key in client.scan_iter(count=1000):
            parts.append(key)
            kind = await client.type(key)
            if kind == b"string":
                parts.append(await client.get(key) or b"")
            elif kind == b"hash":
                for field, value in (await client.hgetall(key)).items():
                    parts += [field, value]
            elif kind == b"zset":
                parts += list(await client.zrange(key, 0, -1))
            elif kind == b"set":
                parts += list(await client.smembers(key))
            elif kind == b"list":
                parts += await client.lrange(key, 0, -1)
        return b"\n".join(part if isinstance(part, bytes) else str(part).encode() for part in parts)
    finally:
        await client.aclose()


@pytest.mark.parametrize("mode", ["redact", "allow"])
async def test_questions_are_stored_redacted(settings: Settings, local_embedder: LocalEmbedder, mode: str) -> None:
    settings = settings.model_copy(update={"guard_pii": mode})
    await seed(settings, local_embedder)
    async with running(settings, local_embedder) as http:
        reply = await ask(http, QUESTION)
        assert reply.status == 200 and reply.meta["cache"] == "miss"

        async def stored() -> bool:
            return bool(await _stored_questions(settings))

        await wait_until(stored, within=10)
    [question] = await _stored_questions(settings)
    assert "[SSN]" in question and "[PHONE]" in question and "[CARD]" in question and "[EMAIL]" in question
    dump = (await _redis_dump(settings)).decode("utf-8", "replace")
    for secret in SECRETS:
        assert secret not in question
        assert secret not in dump
