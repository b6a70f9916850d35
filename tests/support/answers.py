"""A small handbook corpus, and asking the running app over real HTTP: used by most HTTP tests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis.asyncio as aioredis
from pydantic import SecretStr

from ingest.loaders import SourceDocument
from ingest.pipeline import IngestOptions, ingest_documents
from service.embeddings.encoders import LocalEmbedder
from service.http.app import create_app
from service.http.auth import parse_key
from service.postgres.corpus import open_corpus
from service.redis.keyspace import KEYS
from service.redis.limits import utc_day
from service.settings import Settings
from tests.support.provider_server import Behavior, ProviderServer
from tests.support.servers import bearer, make_key, serve_app
from tests.support.sse import aiter_sse, parse_sse

DOCS = [
    SourceDocument(
        "handbook",
        "cache.md",
        "mem://cache.md",
        "Caching",
        "To flush the answer cache, run rag-admin cache flush. It deletes every cached answer at once. "
        "The time to live of cached answers is set with RAG_CACHE_TTL_S.",
    ),
    SourceDocument(
        "handbook",
        "pdf.md",
        "mem://pdf.md",
        "PDF ingest",
        "PDF files are parsed with pypdf. Scanned PDFs without a text layer are rejected with a clear reason.",
    ),
    SourceDocument(
        "security",
        "keys.md",
        "mem://keys.md",
        "API keys",
        "API keys are stored only as hashes. Revoke a key with rag-admin keys revoke followed by its id.",
    ),
]
OPTIONS = IngestOptions(chunk_tokens=200, chunk_overlap=20, window=16)
FLUSH = "How do I flush the cache?"
SLOW_ANSWER = " ".join(f"t{i}" for i in range(30)) + " [1]"


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    body: Any = None

    def of(self, name: str) -> list[dict[str, Any]]:
        return [data for event, data in self.events if event == name]

    @property
    def meta(self) -> dict[str, Any]:
        return self.of("meta")[0]

    @property
    def text(self) -> str:
        return "".join(t["text"] for t in self.of("token"))

    @property
    def names(self) -> list[str]:
        return [event for event, _ in self.events]


async def ask(http: httpx.AsyncClient, question: str = FLUSH, **body: Any) -> Reply:
    headers = body.pop("headers", {})
    response = await http.post("/rag/stream", json={"question": question, **body}, headers=headers)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return Reply(response.status_code, response.headers, parse_sse(response.text))
    return Reply(response.status_code, response.headers, body=response.json())


def with_providers(settings: Settings, provider: ProviderServer, **overrides: Any) -> Settings:
    return settings.model_copy(
        update={
            "anthropic_api_key": SecretStr("sk-ant-test"),
            "anthropic_base_url": provider.base_url,
            "openai_api_key": SecretStr("sk-test"),
            "openai_base_url": provider.openai_base_url,
            "provider_max_retries": 2,
            **overrides,
        }
    )


async def seed(settings: Settings, embedder: LocalEmbedder, docs: list[SourceDocument] = DOCS) -> None:
    async with open_corpus(settings) as corpus:
        await ingest_documents(corpus.store, embedder, docs, OPTIONS)


@asynccontextmanager
async def running(
    settings: Settings, embedder: LocalEmbedder, key: str | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The app on a real server, and a client that sends `key` (default: a fresh query key)."""
    key = key or await make_key(settings, "query")
    async with (
        serve_app(create_app(settings, embedder=embedder)) as url,
        httpx.AsyncClient(base_url=url, timeout=30, headers=bearer(key)) as http,
    ):
        yield http


async def followers_joined(client: aioredis.Redis, n: int) -> bool:
    """True once `n` followers wait on the one in-flight answer (the coalescer counts them in Redis)."""
    keys = [k async for k in client.scan_iter(match="ragcache:followers:*")]
    return bool(keys) and int(await client.get(keys[0]) or 0) >= n


async def seeded_slow(settings: Settings, embedder: LocalEmbedder, provider: ProviderServer) -> Settings:
    """`settings` through `provider`, DOCS seeded, and SLOW_ANSWER streamed over ~2 s: time for followers to join."""
    settings = with_providers(settings, provider)
    await seed(settings, embedder)
    provider.default = Behavior(text=SLOW_ANSWER, first_token_delay=0.5, token_interval=0.05)
    return settings


async def hang_up_after_first_token(http: httpx.AsyncClient, question: str = FLUSH) -> None:
    """Ask `question` and close the connection as soon as the first token arrives."""
    async with http.stream("POST", "/rag/stream", json={"question": question}) as response:
        assert response.status_code == 200
        async for name, _ in aiter_sse(response.aiter_lines()):
            if name == "token":
                return


async def charged(redis_url: str, token: str) -> int:
    """Tokens charged today to the key of `token`, as the limiter keeps them in Redis."""
    parsed = parse_key(token)
    assert parsed is not None
    client = aioredis.from_url(redis_url)
    try:
        day, used = await client.hmget(KEYS.token_budget(parsed[0]), ["day", "used"])
        return int(used or 0) if day == utc_day(time.time()).encode() else 0
    finally:
        await client.aclose()
