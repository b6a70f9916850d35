"""Settings, real servers and HTTP plumbing shared by the tests and the benchmarks."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis
from starlette.types import ASGIApp

from service.embedded import EmbeddedPostgres, EmbeddedValkey
from service.http.auth import KeyStore, Scope
from service.postgres.corpus import open_corpus
from service.settings import Settings
from tests.support.processes import clean_env, is_setting

if TYPE_CHECKING:
    import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent
SHARED_DATA = ROOT.parent / "shared" / "data"
# The ONNX export of the local model, shared by every test and kept between runs (the export
# takes ~20 s of CPU; conftest makes it once before the first test that may need it).
TEST_MODEL_DIR = Path(tempfile.gettempdir()) / f"ragcache-test-models-{os.getuid()}"


@dataclass
class Servers:
    admin_dsn: str  # a database we may CREATE DATABASE from
    redis_url: str
    postgres: EmbeddedPostgres | None
    valkey: EmbeddedValkey | None


def with_database(dsn: str, name: str) -> str:
    """The same server, another database (works for host:port and unix-socket DSNs)."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@asynccontextmanager
async def fresh_database(admin_dsn: str, prefix: str = "ragtest") -> AsyncIterator[str]:
    """A new, empty database on the server at `admin_dsn` (its URL), dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(admin_dsn, name)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def empty_redis_database(redis_url: str, db: int) -> str:
    """The URL of logical database `db` on the same Redis server, flushed."""
    url = f"{redis_url}{'&' if '?' in redis_url else '?'}db={db}"
    client = aioredis.from_url(url)
    await client.flushdb()
    await client.aclose()
    return url


def make_settings(database_url: str, redis_url: str, data_dir: Path, **overrides: Any) -> Settings:
    """Settings from explicit values only: no .env, and nothing leaks in from the environment."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "data_dir": data_dir,
        "model_dir": TEST_MODEL_DIR,
        "anthropic_api_key": None,
        "openai_api_key": None,
        "openai_base_url": None,
        "anthropic_base_url": None,
        "embedding_provider": "local",
        "embedding_model": None,
        "otel_enabled": None,  # tracing off unless a test injects a TracerProvider
        "otel_exporter_otlp_endpoint": None,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def settings_env(settings: Settings) -> dict[str, str]:
    """The service settings that point a console script at the servers, data and models of `settings`."""
    return {
        "DATABASE_URL": str(settings.database_url),
        "REDIS_URL": str(settings.redis_url),
        "RAG_DATA_DIR": str(settings.data_dir),
        "RAG_MODEL_DIR": str(settings.resolved_model_dir()),
    }


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for running a console script against the test servers (as a process of its own)."""
    return clean_env(**(settings_env(settings) | extra))


def use_cli_env(monkeypatch: pytest.MonkeyPatch, settings: Settings, **extra: str) -> None:
    """This process's environment as `cli_env` makes it, for a console script run in the test's process."""
    for name in [n for n in os.environ if is_setting(n)]:
        monkeypatch.delenv(name)
    for name, value in {**settings_env(settings), **extra}.items():
        monkeypatch.setenv(name, value)


async def wait_until(predicate: object, within: float = 10.0, interval: float = 0.02) -> None:
    """Poll an async or sync predicate until true; fail the test after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = predicate() if callable(predicate) else predicate
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


async def make_key(
    settings: Settings,
    scope: Scope = "admin",
    *,
    rpm: int | None = None,
    tokens_per_day: int | None = None,
    collections: Sequence[str] | None = None,
    max_inflight: int | None = None,
) -> str:
    """A real API key in the test database (migrating it first, as the app would).

    `collections`: what it may read (default: `default` for a query key, `*` for an admin key).
    """
    async with open_corpus(settings) as corpus:
        token, _ = await KeyStore(corpus.pool).create(
            f"test-{scope}",
            scope,
            rpm=rpm,
            tokens_per_day=tokens_per_day,
            collections=collections,
            max_inflight=max_inflight,
        )
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def serve_app(app: ASGIApp) -> AsyncIterator[str]:
    """Run the ASGI app on a real uvicorn server on a free loopback port, in this event loop."""
    import uvicorn

    from service.http.proxies import uvicorn_proxy_options

    # Forwarded headers trusted as rag-serve trusts them: from RAG_TRUSTED_PROXIES only.
    settings = getattr(getattr(app, "state", None), "settings", None)
    proxies = uvicorn_proxy_options(settings) if isinstance(settings, Settings) else {"proxy_headers": False}
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning", **proxies)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started or task.done(), within=60)
    if task.done():
        task.result()  # raise the startup error
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def free_port() -> int:
    """A loopback port nobody listens on right now (for a server started in another process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
