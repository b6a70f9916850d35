"""The embedded servers: reused when already running, data kept across restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import redis

from service.embedded import start_postgres, start_valkey


def test_valkey_is_reused_and_keeps_data_across_restarts(tmp_path: Path) -> None:
    first = start_valkey(tmp_path)
    assert first.owned
    client = redis.Redis.from_url(first.url)
    client.set("ragcache:test", "kept")
    second = start_valkey(tmp_path)  # e.g. rag-ingest while rag-serve runs
    assert not second.owned and second.url == first.url
    second.stop()  # not ours: must not stop the server
    assert client.ping()
    client.close()
    first.stop()

    again = start_valkey(tmp_path)
    try:
        assert again.owned
        assert redis.Redis.from_url(again.url).get("ragcache:test") == b"kept"
    finally:
        again.stop()


def test_postgres_keeps_data_across_restarts(tmp_path: Path) -> None:
    async def write(url: str) -> None:
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('yes')")
        await conn.close()

    async def read(url: str) -> str:
        conn = await asyncpg.connect(url)
        try:
            return str(await conn.fetchval("SELECT v FROM kept"))
        finally:
            await conn.close()

    server = start_postgres(tmp_path)
    asyncio.run(write(server.url))
    server.stop()
    assert not (tmp_path / "pg" / "postmaster.pid").exists(), "the server should have stopped"

    restarted = start_postgres(tmp_path)
    try:
        assert asyncio.run(read(restarted.url)) == "yes"
    finally:
        restarted.stop()
