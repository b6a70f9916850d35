"""A scratch corpus for `rag-eval`: an embedded Postgres in a temporary folder, with a BEIR corpus ingested.

`keep` names a folder to reuse across runs instead (an unchanged corpus is not embedded again).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from ingest.beir import BeirError
from ingest.loaders import LoadFailure, SourceDocument
from ingest.pipeline import IngestReport, ingest_into, load_paths
from service.embedded import start_postgres
from service.settings import Settings


def beir_documents(settings: Settings, corpus: Path, limit: int | None = None) -> list[SourceDocument]:
    """The corpus as `rag-ingest add corpus.jsonl --format beir` reads it; a failing line is a BeirError."""
    documents: list[SourceDocument] = []
    for item in load_paths(settings, [str(corpus)], fmt="beir"):
        if isinstance(item, LoadFailure):
            raise BeirError(f"{item.path}: {item.reason}")
        documents.append(item)
    return documents[:limit] if limit is not None else documents


@asynccontextmanager
async def scratch_corpus(
    settings: Settings, corpus: Path, *, keep: Path | None = None, limit: int | None = None
) -> AsyncIterator[tuple[Settings, IngestReport]]:
    """Settings pointing at a scratch database that holds `corpus`, and what ingesting it did.

    The corpus is read (and a malformed line raised) before the database starts.
    """
    documents = beir_documents(settings, corpus, limit)
    work = keep or Path(tempfile.mkdtemp(prefix="rag-eval-"))
    server = start_postgres(work)
    try:
        scratch = settings.model_copy(update={"database_url": server.url})
        report = await ingest_into(scratch, documents)
        yield scratch, report
    finally:
        server.stop()
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
