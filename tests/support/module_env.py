"""One database, Redis database and app for a whole test module.

conftest's `settings` fixture gives each test a fresh database; tests that send dozens of
requests to one app (the schema fuzz, the hostile-input table) share one instead, so the
model, the migrations and the server start once per module.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI

from service.settings import Settings
from tests.support.servers import Servers, make_settings, with_database

# conftest hands out Redis databases 1..15 to single tests; modules use 0 and flush it first.
MODULE_REDIS_DB = 0


@asynccontextmanager
async def module_settings(servers: Servers, data_dir: Path, **overrides: object) -> AsyncIterator[Settings]:
    """Settings for an empty database (dropped afterwards) and an empty Redis database."""
    name = f"ragmod_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(servers.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    redis_url = f"{servers.redis_url}{'&' if '?' in servers.redis_url else '?'}db={MODULE_REDIS_DB}"
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    try:
        yield make_settings(with_database(servers.admin_dsn, name), redis_url, data_dir, **overrides)
    finally:
        admin = await asyncpg.connect(servers.admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """uvicorn on a free loopback port, in a thread with its own event loop.

    For synchronous clients (schemathesis): conftest's `serve_app` runs the server in the
    test's event loop, which does not turn while a synchronous test runs.
    """
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, name="module-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the app did not start (see the log above)")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
