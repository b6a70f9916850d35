"""Twenty questions a newcomer asks the demo corpus (`examples/`), with the fact each answer must state.

Written before the handbook was rewritten, from what a first-time user of `make run` wants to know,
so the set measures the handbook and the offline generator rather than restating them. Each row
names the fact as a regular expression (case-insensitive) and the documents that may be cited for it.
Used by tests/integration/test_demo_corpus.py and bench/demo.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from ingest.loaders import discover, load
from ingest.pipeline import IngestOptions, ingest_documents
from service.embeddings.encoders import LocalEmbedder
from service.postgres.corpus import open_corpus
from service.settings import Settings

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
_CITATION = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class DemoQuestion:
    question: str
    fact: str  # a regular expression the answer must match (case-insensitive)
    documents: frozenset[str]  # documents a citation of the fact may point at


def _q(question: str, fact: str, *documents: str) -> DemoQuestion:
    return DemoQuestion(question, fact, frozenset(documents))


QUESTIONS: tuple[DemoQuestion, ...] = (
    _q("How do I create an API key?", r"rag-admin keys create", "security.md", "operations.md", "faq.txt"),
    _q("How do I flush the cache?", r"rag-admin cache flush", "caching.md", "operations.md", "faq.txt"),
    _q(
        "What does coalescing do?",
        r"(one|a single) (generation|provider call|model call)|join",
        "caching.md",
        "faq.txt",
        "glossary.html",
    ),
    _q("What happens when Redis goes down?", r"\bmiss(es)?\b|degraded|fail(s)? open", "caching.md", "faq.txt"),
    _q("How do I ingest a PDF?", r"rag-ingest add", "ingestion.md", "faq.txt"),
    _q("How do I start the service on my laptop?", r"make run", "operations.md", "overview.md", "faq.txt"),
    _q("How long are answers cached?", r"RAG_CACHE_TTL_S|one week|7 days", "caching.md", "faq.txt"),
    _q("How do I revoke an API key?", r"rag-admin keys revoke", "security.md", "operations.md", "faq.txt"),
    _q(
        "Can I use the OpenAI SDK with ragcache?",
        r"/v1/chat/completions|base_url",
        "overview.md",
        "openai.md",
        "faq.txt",
    ),
    _q("Do I need an OpenAI or Anthropic API key?", r"extractive|offline", "routing.md", "overview.md", "faq.txt"),
    _q("How can I force a fresh answer instead of the cached one?", r"refresh", "caching.md", "faq.txt"),
    _q(
        "What is the semantic cache?",
        r"means the same|semantic_hit|paraphrase|same meaning",
        "caching.md",
        "glossary.html",
        "faq.txt",
    ),
    _q("Where can I see the cache hit ratio?", r"/dashboard|cache stats", "operations.md", "caching.md", "faq.txt"),
    _q(
        "What happens when Postgres is down?",
        r"database_unavailable|cached answers|hits",
        "troubleshooting.md",
        "operations.md",
        "faq.txt",
    ),
    _q(
        "What does a 429 rate_limited error mean?",
        r"requests per minute|Retry-After|rpm",
        "security.md",
        "troubleshooting.md",
        "faq.txt",
    ),
    _q("How do I run several worker processes?", r"--workers", "operations.md", "faq.txt"),
    _q("How big are the chunks?", r"400 tokens|RAG_CHUNK_TOKENS", "ingestion.md", "faq.txt", "glossary.html"),
    _q("Where does ragcache keep its data?", r"\.ragcache|RAG_DATA_DIR", "operations.md", "faq.txt"),
    _q("How do I limit how many tokens a key can spend per day?", r"--tokens-per-day", "security.md", "faq.txt"),
    _q(
        "How do I point ragcache at a local Ollama or vLLM server?",
        r"OPENAI_BASE_URL",
        "routing.md",
        "operations.md",
        "faq.txt",
    ),
)


@dataclass(frozen=True)
class DemoOutcome:
    question: DemoQuestion
    answer: str
    cited_documents: frozenset[str]  # documents of the sources the answer cites

    @property
    def states_fact(self) -> bool:
        return re.search(self.question.fact, self.answer, re.IGNORECASE) is not None

    @property
    def cites_right_document(self) -> bool:
        return bool(self.cited_documents & self.question.documents)

    @property
    def ok(self) -> bool:
        return self.states_fact and self.cites_right_document


async def outcome(settings: Settings, question: DemoQuestion, body: dict[str, Any]) -> DemoOutcome:
    """Judge one `/rag/answer` body: does it state the fact, and cite a chunk of an expected document?"""
    answer = str(body["answer"])
    chunk_of = {int(s["n"]): int(s["chunk_id"]) for s in body["sources"]}
    cited_chunks = [chunk_of[int(n)] for n in _CITATION.findall(answer) if int(n) in chunk_of]
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT d.external_id FROM chunks c JOIN documents d ON d.id = c.document_id WHERE c.id = ANY($1)",
            cited_chunks,
        )
    finally:
        await conn.close()
    return DemoOutcome(question, answer, frozenset(Path(r["external_id"]).name for r in rows))


async def ingest_examples(settings: Settings, embedder: LocalEmbedder, examples: Path = EXAMPLES) -> int:
    """Ingest examples/ as `make run` does (source `handbook`); returns the number of documents added."""
    entries, failures = discover([str(examples)], source="handbook")
    assert not failures, failures
    items = [doc for entry in entries for doc in load(entry)]
    async with open_corpus(settings) as corpus:
        report = await ingest_documents(corpus.store, embedder, items, IngestOptions.from_settings(settings))
    return report.added
