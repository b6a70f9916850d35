"""The ingest run: skip unchanged documents, chunk, embed in batches, write atomically.

Embedding (CPU-bound, in a worker thread) overlaps with writing the previous batch
(COPY into Postgres), so on a local model the database costs almost nothing extra.
Each written batch holds only whole documents, which is what makes a killed run safe
to repeat: a document is either fully written with its final hash or not at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from ingest.chunking import CHUNKER_VERSION, chunk_text
from ingest.loaders import FileLimits, Format, LoadFailure, SourceDocument, discover, load
from service.embeddings.encoders import Embedder
from service.policy.collections import DEFAULT
from service.policy.tokens import encoding
from service.postgres.corpus import open_corpus
from service.postgres.documents import ChunkRecord, DocumentKey, DocumentStore, PreparedDocument
from service.settings import Settings

_HASH_LOOKUP_BATCH = 10_000


@dataclass(frozen=True)
class IngestOptions:
    chunk_tokens: int = 400
    chunk_overlap: int = 50
    window: int = 1024  # texts per embedder call (the embedder batches inside it)

    @classmethod
    def from_settings(cls, settings: Settings) -> IngestOptions:
        return cls(settings.chunk_tokens, settings.chunk_overlap, settings.embed_window)


@dataclass
class IngestReport:
    documents: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    chunks: int = 0
    tokens: int = 0
    embeddings_computed: int = 0
    failures: list[LoadFailure] = field(default_factory=list)
    skipped: list[LoadFailure] = field(default_factory=list)  # left out on purpose (symbolic links)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["failed"] = len(self.failures)
        data["ok"] = self.ok
        data["seconds"] = round(self.seconds, 3)
        return data


class Progress(Protocol):
    def start(self, documents: int) -> None: ...

    def advance(self, documents: int, chunks: int, tokens: int) -> None: ...


class _NoProgress:
    def start(self, documents: int) -> None:
        pass

    def advance(self, documents: int, chunks: int, tokens: int) -> None:
        pass


def content_hash(doc: SourceDocument, options: IngestOptions, embedding_model: str) -> str:
    """Changes whenever the stored chunks or vectors would change, and only then."""
    canonical = json.dumps(
        [
            CHUNKER_VERSION,
            options.chunk_tokens,
            options.chunk_overlap,
            embedding_model,
            doc.title,
            doc.text,
            doc.uri,
            doc.metadata,
        ],
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def prepare(doc: SourceDocument, digest: str, options: IngestOptions) -> PreparedDocument:
    chunks = chunk_text(doc.text, max_tokens=options.chunk_tokens, overlap=options.chunk_overlap, encoding=encoding())
    return PreparedDocument(
        source=doc.source,
        external_id=doc.external_id,
        uri=doc.uri,
        title=doc.title,
        content_hash=digest,
        metadata=doc.metadata,
        chunks=[ChunkRecord(c.ordinal, c.text, c.token_count) for c in chunks],
        collection=doc.collection,
    )


async def ingest_documents(
    store: DocumentStore,
    embedder: Embedder,
    items: Iterable[SourceDocument | LoadFailure],
    options: IngestOptions,
    progress: Progress | None = None,
) -> IngestReport:
    started = time.perf_counter()
    progress = progress or _NoProgress()
    report = IngestReport()
    docs: dict[DocumentKey, tuple[SourceDocument, str]] = {}
    for item in items:
        if isinstance(item, LoadFailure):
            (report.skipped if item.skipped else report.failures).append(item)
            continue
        key = (item.collection, item.source, item.external_id)
        if key in docs:
            report.failures.append(LoadFailure(item.uri, f"duplicate document id {item.external_id!r}"))
            continue
        docs[key] = (item, content_hash(item, options, embedder.model))
    report.documents = len(docs)
    progress.start(len(docs))

    stored = await _stored_hashes(store, list(docs))
    todo = [(doc, digest) for key, (doc, digest) in docs.items() if stored.get(key) != digest]
    report.unchanged = len(docs) - len(todo)
    if report.unchanged:
        progress.advance(report.unchanged, 0, 0)
    if todo:
        await _embed_and_write(store, embedder, todo, options, report, progress)
    report.seconds = time.perf_counter() - started
    return report


def load_paths(
    settings: Settings,
    paths: Sequence[str],
    *,
    fmt: Format = "auto",
    source: str | None = None,
    follow_symlinks: bool = False,
    collection: str = DEFAULT,
) -> list[SourceDocument | LoadFailure]:
    """Files, folders and globs read as `rag-ingest` reads them: RAG_DATA_DIR refused, each file within
    RAG_INGEST_MAX_FILE_BYTES and RAG_INGEST_FILE_TIMEOUT_S, every document in `collection`."""
    entries, failures = discover(paths, source=source, follow_symlinks=follow_symlinks, data_dir=settings.data_dir)
    limits = FileLimits(settings.ingest_max_file_bytes, settings.ingest_file_timeout_s)
    items: list[SourceDocument | LoadFailure] = list(failures)
    for entry in entries:
        items.extend(load(entry, fmt, limits))
    return [replace(i, collection=collection) if isinstance(i, SourceDocument) else i for i in items]


async def ingest_into(
    settings: Settings, items: Iterable[SourceDocument | LoadFailure], progress: Progress | None = None
) -> IngestReport:
    """`items` into the corpus `settings` point at, embedded with the settings' model and chunked as they say."""
    async with open_corpus(settings, with_embedder=True) as corpus:
        assert corpus.embedder is not None
        return await ingest_documents(
            corpus.store, corpus.embedder, items, IngestOptions.from_settings(settings), progress
        )


async def _stored_hashes(store: DocumentStore, keys: Sequence[DocumentKey]) -> dict[DocumentKey, str]:
    found: dict[DocumentKey, str] = {}
    for start in range(0, len(keys), _HASH_LOOKUP_BATCH):
        found.update(await store.content_hashes(keys[start : start + _HASH_LOOKUP_BATCH]))
    return found


async def _embed_and_write(
    store: DocumentStore,
    embedder: Embedder,
    todo: list[tuple[SourceDocument, str]],
    options: IngestOptions,
    report: IngestReport,
    progress: Progress,
) -> None:
    queue: asyncio.Queue[list[PreparedDocument] | None] = asyncio.Queue(maxsize=2)

    async def writer() -> None:
        while (batch := await queue.get()) is not None:
            result = await store.write_documents(batch)
            report.added += result.inserted
            report.updated += result.updated
            report.chunks += result.chunks
            tokens = sum(d.token_count for d in batch)
            report.tokens += tokens
            progress.advance(len(batch), result.chunks, tokens)

    writing = asyncio.create_task(writer())
    try:
        pending: list[PreparedDocument] = []  # documents whose chunks are not all embedded yet
        texts: list[str] = []
        for doc, digest in todo:
            prepared = prepare(doc, digest, options)
            pending.append(prepared)
            texts.extend(c.text for c in prepared.chunks)
            while len(texts) >= options.window:
                texts = await _embed_batch(embedder, pending, texts, options.window, report)
                await _put_complete(queue, pending, writing)
        while texts:
            texts = await _embed_batch(embedder, pending, texts, options.window, report)
        await _put_complete(queue, pending, writing)
        await queue.put(None)
        await writing
    finally:
        if not writing.done():
            writing.cancel()


async def _embed_batch(
    embedder: Embedder, pending: list[PreparedDocument], texts: list[str], size: int, report: IngestReport
) -> list[str]:
    """Embed the first `size` queued texts and hand the vectors to the documents they belong to."""
    batch, rest = texts[:size], texts[size:]
    vectors = await embedder.embed(batch)
    report.embeddings_computed += len(batch)
    offset = 0
    for doc in pending:
        have = 0 if doc.embeddings is None else len(doc.embeddings)
        need = len(doc.chunks) - have
        if need == 0:
            continue
        take = vectors[offset : offset + need]
        doc.embeddings = take if doc.embeddings is None else np.concatenate([doc.embeddings, take])
        offset += len(take)
        if offset >= len(vectors):
            break
    return rest


async def _put_complete(
    queue: asyncio.Queue[list[PreparedDocument] | None],
    pending: list[PreparedDocument],
    writing: asyncio.Task[None],
) -> None:
    done = [d for d in pending if d.embeddings is not None and len(d.embeddings) == len(d.chunks)]
    if not done:
        return
    pending[:] = pending[len(done) :]  # documents complete in order, so the finished ones lead
    if writing.done():  # surface a write failure now rather than after embedding everything
        writing.result()
    await queue.put(done)
