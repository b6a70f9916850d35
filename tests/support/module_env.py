"""One database, Redis database and app for a whole test module.

conftest's `settings` fixture gives each test a fresh database; tests that send dozens of
requests to one app (the schema fuzz, the hostile-input table) share one instead, so the
model, the migrations and the server start once per module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from service.settings import Settings
from tests.support.servers import Servers, empty_redis_database, fresh_database, make_settings

# conftest hands out Redis databases 1..15 to single tests; modules use 0 and flush it first.
MODULE_REDIS_DB = 0


@asynccontextmanager
async def module_settings(servers: Servers, data_dir: Path, **overrides: object) -> AsyncIterator[Settings]:
    """Settings for an empty database (dropped afterwards) and an empty Redis database."""
    async with fresh_database(servers.admin_dsn, "ragmod") as database_url:
        redis_url = await empty_redis_database(servers.redis_url, MODULE_REDIS_DB)
        yield make_settings(database_url, redis_url, data_dir, **overrides)


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
