"""`rag-ingest`: load documents into the corpus.

Exit codes: 0 all good, 1 some files or lines failed (the rest was ingested),
2 nothing could be done (bad arguments, database unreachable, embedding model mismatch).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from contextlib import suppress
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ingest.loaders import Format, LoadFailure, SourceDocument
from ingest.pipeline import IngestReport, ingest_into, load_paths
from service.policy.collections import DEFAULT, valid_name
from service.postgres.corpus import open_corpus
from service.postgres.db import DATABASE_ERRORS, CorpusMismatchError, database_failure
from service.postgres.documents import corpus_status
from service.settings import Settings

app = typer.Typer(help="Load documents into the ragcache corpus.", no_args_is_help=True, add_completion=False)
out = Console()
err = Console(stderr=True)

T = TypeVar("T")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary.")]
SourceOpt = Annotated[str | None, typer.Option("--source", help="Tag documents with this source name.")]
CollectionOpt = Annotated[
    str, typer.Option("--collection", help="The collection the documents belong to (who may read them).")
]
FormatOpt = Annotated[str, typer.Option("--format", help="auto | jsonl | beir")]
FollowOpt = Annotated[
    bool,
    typer.Option(
        "--follow-symlinks",
        help="Follow symbolic links that resolve inside the folder given (default: skip every link).",
    ),
]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except CorpusMismatchError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except DATABASE_ERRORS as exc:
        err.print(f"[red]error:[/] {escape(database_failure(exc))}", highlight=False)
        raise typer.Exit(2) from None


class _ProgressView:
    """A rich bar on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.tty = enabled and err.is_terminal
        self.enabled = enabled
        self.documents = self.chunks = self.tokens = 0
        self.total = 0
        self.started = time.perf_counter()
        self._last_line = 0.0
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> _ProgressView:
        if self.tty:
            self._bar = Progress(
                TextColumn("[bold]ingest"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("docs · {task.fields[chunks]} chunks · {task.fields[rate]} tok/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=err,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("ingest", total=None, chunks=0, rate=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

    def start(self, documents: int) -> None:
        self.total = documents
        self.started = time.perf_counter()
        if self._bar is not None:
            self._bar.update(self._task, total=documents)

    def advance(self, documents: int, chunks: int, tokens: int) -> None:
        self.documents += documents
        self.chunks += chunks
        self.tokens += tokens
        rate = int(self.tokens / max(time.perf_counter() - self.started, 1e-6))
        if self._bar is not None:
            self._bar.update(self._task, advance=documents, chunks=self.chunks, rate=rate)
        elif self.enabled and (time.perf_counter() - self._last_line > 5 or self.documents == self.total):
            self._last_line = time.perf_counter()
            err.print(f"ingest: {self.documents}/{self.total} documents, {self.chunks} chunks, {rate} tokens/s")


def _print_report(report: IngestReport, as_json: bool) -> None:
    if as_json:
        data = report.as_dict()
        data["failures"] = [{"path": f.path, "reason": f.reason} for f in report.failures]
        data["skipped"] = [{"path": f.path, "reason": f.reason} for f in report.skipped]
        out.print_json(json.dumps(data))
    else:
        for skipped in report.skipped:
            err.print(f"[yellow]skipped[/] {escape(skipped.path)}: {escape(skipped.reason)}", highlight=False)
        for failure in report.failures:
            err.print(f"[red]failed[/] {escape(failure.path)}: {escape(failure.reason)}", highlight=False)
        out.print(
            f"{report.documents} documents: {report.added} added, {report.updated} updated, "
            f"{report.unchanged} unchanged, {report.deleted} deleted; {report.chunks} chunks, "
            f"{report.tokens} tokens, {report.embeddings_computed} embeddings computed; "
            f"{len(report.failures)} failed; {report.seconds:.1f}s"
        )
    if not report.ok:
        raise typer.Exit(1)


def _collection(name: str) -> str:
    if not valid_name(name):
        err.print("[red]error:[/] --collection: use letters, digits, '.', '_' or '-' (max 64)")
        raise typer.Exit(2)
    return name


def _format(fmt: str) -> Format:
    if fmt not in ("auto", "jsonl", "beir"):
        err.print(f"[red]error:[/] --format must be auto, jsonl or beir, not {fmt!r}")
        raise typer.Exit(2)
    return fmt  # type: ignore[return-value]


async def _ingest(settings: Settings, items: list[SourceDocument | LoadFailure], show_progress: bool) -> IngestReport:
    with _ProgressView(show_progress) as view:
        return await ingest_into(settings, items, view)


@app.command()
def add(
    paths: Annotated[list[str], typer.Argument(help="Files, folders (recursive) or glob patterns.")],
    source: SourceOpt = None,
    fmt: FormatOpt = "auto",
    follow_symlinks: FollowOpt = False,
    as_json: JsonFlag = False,
    collection: CollectionOpt = DEFAULT,
) -> None:
    """Add new and changed documents; unchanged ones are skipped without re-embedding."""
    settings = Settings()
    items = load_paths(
        settings,
        paths,
        fmt=_format(fmt),
        source=source,
        follow_symlinks=follow_symlinks,
        collection=_collection(collection),
    )
    _print_report(_run(_ingest(settings, items, not as_json)), as_json)


@app.command()
def sync(
    directory: Annotated[Path, typer.Argument(help="The folder that is the whole truth for its source.")],
    source: SourceOpt = None,
    fmt: FormatOpt = "auto",
    follow_symlinks: FollowOpt = False,
    as_json: JsonFlag = False,
    collection: CollectionOpt = DEFAULT,
) -> None:
    """Make a source (within a collection) match a folder: add new and changed documents, delete those gone."""
    if not directory.is_dir():
        err.print(f"[red]error:[/] {directory}: not a directory")
        raise typer.Exit(2)
    name = source or directory.resolve().name
    collection = _collection(collection)
    settings = Settings()
    items = load_paths(
        settings,
        [str(directory)],
        fmt=_format(fmt),
        source=name,
        follow_symlinks=follow_symlinks,
        collection=collection,
    )

    async def run() -> IngestReport:
        report = await _ingest(settings, items, not as_json)
        present = {i.external_id for i in items if isinstance(i, SourceDocument)}
        # A file that exists but failed to load keeps its previous version.
        present |= {
            Path(f.path).relative_to(directory).as_posix() for f in report.failures if _inside(f.path, directory)
        }
        async with open_corpus(settings) as corpus:
            gone = sorted(await corpus.store.external_ids(name, collection) - present)
            if gone:
                report.deleted = await corpus.store.delete_documents(
                    source=name, external_ids=gone, collection=collection
                )
        return report

    _print_report(_run(run()), as_json)


def _inside(path: str, directory: Path) -> bool:
    with suppress(ValueError):
        Path(path).relative_to(directory)
        return True
    return False


@app.command()
def delete(
    source: SourceOpt = None,
    ids: Annotated[list[str] | None, typer.Option("--id", help="External document id (repeatable).")] = None,
    as_json: JsonFlag = False,
    collection: CollectionOpt = DEFAULT,
) -> None:
    """Delete documents by source, by id, or by id within a source; always within one collection."""
    if source is None and not ids:
        err.print("[red]error:[/] give --source NAME and/or --id ID")
        raise typer.Exit(2)
    collection = _collection(collection)

    async def run() -> int:
        async with open_corpus(Settings(), migrate_schema=False) as corpus:
            if not (await corpus_status(corpus.pool)).initialised:
                return 0  # nothing to delete, and no schema to create for it
        async with open_corpus(Settings()) as corpus:  # pending migrations first (0006 adds `collection`)
            return await corpus.store.delete_documents(source=source, external_ids=ids or [], collection=collection)

    deleted = _run(run())
    if as_json:
        out.print_json(json.dumps({"deleted": deleted}))
    else:
        out.print(f"{deleted} documents deleted")


@app.command()
def status(as_json: JsonFlag = False) -> None:
    """Documents, chunks, tokens, embedding model and indexes of the corpus."""

    async def run() -> dict[str, Any]:
        async with open_corpus(Settings(), migrate_schema=False) as corpus:
            info = await corpus_status(corpus.pool)
            return info.__dict__

    info = _run(run())
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(title="ragcache corpus", show_header=False)
    for key in (
        "embedding_model",
        "embedding_dim",
        "documents",
        "chunks",
        "tokens",
        "hnsw_index",
        "fulltext_index",
    ):
        table.add_row(key, str(info[key]))
    for name, counts in info["collections"].items():
        table.add_row(f"collection {name}", f"{counts['documents']} documents, {counts['chunks']} chunks")
    for name, counts in info["sources"].items():
        table.add_row(f"source {name}", f"{counts['documents']} documents, {counts['chunks']} chunks")
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
