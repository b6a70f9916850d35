"""Ingest throughput against the raw encoder, measured side by side in one run.

    python -m bench.ingest [CORPUS_PATH] [--limit N] [--batch-size 64] [--repeat 1] [--diagnose] [--no-write]

One embedded Postgres in a fresh temp dir, one model load (excluded from both sides), one
warm-up encode; then per round, in alternating order so drift and noise hit both sides:

- raw:    `LocalEmbedder.encode(all chunk texts)`, i.e. the plain `SentenceTransformer.encode`
          with the same batch size, on exactly the chunk texts the pipeline produces;
- ingest: `ingest_documents` end to end into a fresh, empty database (loading, hashing,
          chunking, embedding, COPY and index maintenance);
- re-run: the same ingest again, every document unchanged.

`--diagnose` also times the raw encoder fed the pipeline's own batches (consecutive slices
of `batch_size` texts in document order), which separates "the model sees differently
shaped batches" from "the pipeline around the model costs time".

The result replaces the "Ingest" section of docs/benchmarks.md (its `### Notes` are kept)
unless `--no-write`. The benchmark data lives outside the project (`../shared`); only this
script reads it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from bench.common import (
    SHARED_DATA,
    cpu_model,
    load_text,
    make_settings,
    nproc,
    publish,
    revision,
    say,
    today,
    with_database,
)
from ingest.loaders import LoadFailure, SourceDocument, discover, load
from ingest.pipeline import IngestOptions, IngestReport, ingest_documents, prepare
from service.embedded import EmbeddedPostgres, start_postgres
from service.embeddings.encoders import LocalEmbedder, Vectors
from service.postgres.corpus import open_corpus
from service.postgres.documents import DocumentKey, DocumentStore, PreparedDocument, WriteResult

DEFAULT_CORPUS = SHARED_DATA / "msmarco-5k" / "corpus.jsonl"
SECTION = "Ingest"
FULL_CORPUS_DOCUMENTS = 5_000
GOAL_RATIO = 0.9

Items = list[SourceDocument | LoadFailure]


# --------------------------------------------------------------------------- instrumentation


class TimedEmbedder:
    """Wraps the real embedder and adds up the wall time the pipeline spends awaiting it."""

    def __init__(self, inner: LocalEmbedder) -> None:
        self.inner = inner
        self.model = inner.model
        self.dim = inner.dim
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    async def embed(self, texts: Sequence[str]) -> Vectors:
        started = time.perf_counter()
        try:
            return await self.inner.embed(texts)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1


class TimedStore(DocumentStore):
    """The real store; adds up time spent in writes (they overlap embedding) and hash look-ups."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.write_seconds = 0.0
        self.writes = 0
        self.lookup_seconds = 0.0

    async def write_documents(self, docs: Sequence[PreparedDocument]) -> WriteResult:
        started = time.perf_counter()
        try:
            return await super().write_documents(docs)
        finally:
            self.write_seconds += time.perf_counter() - started
            self.writes += 1

    async def content_hashes(self, keys: Iterable[DocumentKey]) -> dict[DocumentKey, str]:
        started = time.perf_counter()
        try:
            return await super().content_hashes(keys)
        finally:
            self.lookup_seconds += time.perf_counter() - started


# --------------------------------------------------------------------------- results


@dataclass
class IngestTiming:
    seconds: float
    load_seconds: float
    embed_seconds: float
    embed_calls: int
    write_seconds: float
    writes: int
    lookup_seconds: float
    report: IngestReport

    @property
    def other_seconds(self) -> float:
        """Time neither loading nor waiting for the model: hashing, chunking, DB work not overlapped."""
        return self.seconds - self.load_seconds - self.embed_seconds


@dataclass
class Round:
    number: int
    order: str
    raw_seconds: float = 0.0
    raw_batched_seconds: float | None = None
    ingest: IngestTiming | None = None
    rerun: IngestTiming | None = None
    db_documents: int = 0
    db_chunks: int = 0
    load_average: str = "n/a"


@dataclass
class Summary:
    corpus: Path
    command: str
    documents: int
    chunks: int
    batch_size: int
    rounds: list[Round] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)


def _rate(chunks: int, seconds: float) -> float:
    return chunks / seconds if seconds > 0 else float("inf")


# --------------------------------------------------------------------------- data


def load_items(corpus: Path, limit: int | None) -> Items:
    """discover + load, exactly as `rag-ingest add PATH --format beir` does."""
    entries, failures = discover([str(corpus)])
    items: Items = list(failures)
    for entry in entries:
        items.extend(load(entry, "beir"))
    if limit is not None:
        docs = itertools.islice((i for i in items if isinstance(i, SourceDocument)), limit)
        items = [*(i for i in items if isinstance(i, LoadFailure)), *docs]
    return items


def chunk_texts(items: Items, options: IngestOptions) -> list[str]:
    """The chunk texts the pipeline embeds, in the order it embeds them."""
    seen: set[tuple[str, str]] = set()
    texts: list[str] = []
    for item in items:
        if isinstance(item, LoadFailure) or (item.source, item.external_id) in seen:
            continue
        seen.add((item.source, item.external_id))
        texts.extend(c.text for c in prepare(item, "", options).chunks)
    return texts


# --------------------------------------------------------------------------- the run


async def timed_ingest(
    store: TimedStore, embedder: TimedEmbedder, corpus: Path, limit: int | None, options: IngestOptions
) -> IngestTiming:
    embedder.reset()
    store.write_seconds = store.lookup_seconds = 0.0
    store.writes = 0
    started = time.perf_counter()
    items = load_items(corpus, limit)
    loaded = time.perf_counter()
    report = await ingest_documents(store, embedder, items, options)
    seconds = time.perf_counter() - started
    return IngestTiming(
        seconds=seconds,
        load_seconds=loaded - started,
        embed_seconds=embedder.seconds,
        embed_calls=embedder.calls,
        write_seconds=store.write_seconds,
        writes=store.writes,
        lookup_seconds=store.lookup_seconds,
        report=report,
    )


def timed_raw(embedder: LocalEmbedder, texts: list[str]) -> float:
    started = time.perf_counter()
    vectors = embedder.encode(texts)
    seconds = time.perf_counter() - started
    assert vectors.shape == (len(texts), embedder.dim), vectors.shape
    return seconds


def timed_raw_batched(embedder: LocalEmbedder, texts: list[str], batch_size: int) -> float:
    """The raw encoder fed the same consecutive batches the pipeline hands it."""
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        embedder.encode(texts[start : start + batch_size])
    return time.perf_counter() - started


async def run_round(
    number: int,
    pg: EmbeddedPostgres,
    data_dir: Path,
    embedder: LocalEmbedder,
    texts: list[str],
    args: argparse.Namespace,
    options: IngestOptions,
) -> Round:
    raw_first = number % 2 == 1
    result = Round(number, "raw → ingest → re-run" if raw_first else "ingest → re-run → raw")
    name = f"bench_ingest_{os.getpid()}_{number}"
    admin = await asyncpg.connect(pg.url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()

    def raw_side() -> None:
        result.raw_seconds = timed_raw(embedder, texts)
        say(f"  raw encode: {result.raw_seconds:.1f}s ({_rate(len(texts), result.raw_seconds):.1f} chunks/s)")
        if args.diagnose:
            result.raw_batched_seconds = timed_raw_batched(embedder, texts, options.window)
            say(
                f"  raw encode, pipeline batches: {result.raw_batched_seconds:.1f}s "
                f"({_rate(len(texts), result.raw_batched_seconds):.1f} chunks/s)"
            )

    try:
        if raw_first:
            raw_side()
        # Migrating the fresh database is setup, not ingest: it happens once per corpus.
        async with open_corpus(make_settings(with_database(pg.url, name), None, data_dir)) as corpus:
            store = TimedStore(corpus.pool)
            timed = TimedEmbedder(embedder)
            result.ingest = await timed_ingest(store, timed, args.corpus, args.limit, options)
            say(
                f"  ingest: {result.ingest.seconds:.1f}s "
                f"({_rate(result.ingest.report.chunks, result.ingest.seconds):.1f} chunks/s)"
            )
            result.rerun = await timed_ingest(store, timed, args.corpus, args.limit, options)
            say(f"  re-run (unchanged): {result.rerun.seconds:.2f}s")
            result.db_documents = int(await corpus.pool.fetchval("SELECT count(*) FROM documents"))
            result.db_chunks = int(await corpus.pool.fetchval("SELECT count(*) FROM chunks"))
        if not raw_first:
            raw_side()
    finally:
        admin = await asyncpg.connect(pg.url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    return result


def check_round(result: Round, documents: int, chunks: int, full_corpus: bool) -> None:
    """Sanity: the numbers describe a complete, correct ingest, not a fast broken one."""
    assert result.ingest is not None and result.rerun is not None
    first, again = result.ingest.report, result.rerun.report
    problems: list[str] = []
    if first.failures:
        problems.append(f"{len(first.failures)} load failures, first: {first.failures[0]}")
    if (first.documents, first.added, first.chunks) != (documents, documents, chunks):
        problems.append(f"ingest reported {first.documents} docs / {first.added} added / {first.chunks} chunks")
    if first.embeddings_computed != chunks:
        problems.append(f"ingest computed {first.embeddings_computed} embeddings for {chunks} chunks")
    if (result.db_documents, result.db_chunks) != (documents, chunks):
        problems.append(f"the database holds {result.db_documents} documents and {result.db_chunks} chunks")
    if full_corpus and result.db_documents != FULL_CORPUS_DOCUMENTS:
        problems.append(f"full corpus: expected {FULL_CORPUS_DOCUMENTS} documents, found {result.db_documents}")
    if (again.unchanged, again.added, again.updated, again.embeddings_computed) != (documents, 0, 0, 0):
        problems.append(
            f"re-run was not a no-op: {again.unchanged} unchanged, {again.added} added, "
            f"{again.updated} updated, {again.embeddings_computed} embeddings"
        )
    if problems:
        raise SystemExit("sanity check failed:\n  " + "\n  ".join(problems))


def machine_info(embedder: LocalEmbedder) -> dict[str, str]:
    import sentence_transformers
    import torch

    return {
        "cpu": cpu_model(),
        "nproc": str(nproc()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "sentence-transformers": sentence_transformers.__version__,
        "python": platform.python_version(),
        "model": f"{embedder.model} (max_seq_length {embedder._load().max_seq_length})",
    }


# --------------------------------------------------------------------------- reporting


def _median(values: Iterator[float]) -> float:
    return statistics.median(list(values))


def render(summary: Summary) -> str:
    n = summary.chunks
    rounds = summary.rounds
    raw = _median(r.raw_seconds for r in rounds)
    ing = _median(r.ingest.seconds for r in rounds if r.ingest)
    rerun = _median(r.rerun.seconds for r in rounds if r.rerun)
    ratio = _rate(n, ing) / _rate(n, raw)
    lines = [
        f"Command: `{summary.command}`  ",
        f"Date: {today()}, commit {revision()}  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in summary.machine.items()),
        "",
        "| documents | chunks | batch size | raw encoder chunks/s | ingest chunks/s | ingest / raw "
        "| re-run (unchanged) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {summary.documents:,} | {n:,} | {summary.batch_size} | {_rate(n, raw):.1f} | {_rate(n, ing):.1f} "
        f"| **{ratio:.2f}** | {rerun:.2f} s |",
        "",
        f"Goal ingest / raw ≥ {GOAL_RATIO}: **{'met' if ratio >= GOAL_RATIO else 'not met'}**"
        + (f" (medians of {len(rounds)} rounds)" if len(rounds) > 1 else ""),
        "",
        "Per round (seconds; ingest = load + hash + chunk + embed + COPY + index maintenance):",
        "",
        "| round | order | raw | raw, pipeline batches | ingest | of which: load / awaiting model / other "
        "| DB writes (overlapped) | ratio | re-run | load avg after |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rounds:
        assert r.ingest is not None and r.rerun is not None
        i = r.ingest
        batched = f"{r.raw_batched_seconds:.1f}" if r.raw_batched_seconds is not None else "–"
        lines.append(
            f"| {r.number} | {r.order} | {r.raw_seconds:.1f} | {batched} | {i.seconds:.1f} "
            f"| {i.load_seconds:.2f} / {i.embed_seconds:.1f} / {i.other_seconds:.2f} "
            f"| {i.write_seconds:.2f} ({i.writes} txns) | {r.raw_seconds / i.seconds:.2f} "
            f"| {r.rerun.seconds:.2f} | {r.load_average} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", nargs="?", type=Path, default=DEFAULT_CORPUS, help="BEIR corpus.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="only the first N documents")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size, both sides (default 64)")
    parser.add_argument(
        "--window", type=int, default=1024, help="texts per embedder call in the pipeline (RAG_EMBED_WINDOW)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds, alternating the order (default 1)")
    parser.add_argument(
        "--diagnose", action="store_true", help="also time the raw encoder on the pipeline's own batches"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--repeat, --batch-size and --limit must be positive")
    return args


async def bench(args: argparse.Namespace, command: str) -> Summary:
    options = IngestOptions(window=args.window)
    items = load_items(args.corpus, args.limit)
    failures = [i for i in items if isinstance(i, LoadFailure)]
    if failures:
        raise SystemExit(f"{len(failures)} load failures, first: {failures[0]}")
    documents = len({(i.source, i.external_id) for i in items if isinstance(i, SourceDocument)})
    texts = chunk_texts(items, options)
    del items
    say(f"{args.corpus}: {documents} documents, {len(texts)} chunks")

    embedder = LocalEmbedder(batch_size=args.batch_size)
    started = time.perf_counter()
    embedder._load()  # model load is excluded from both sides
    embedder.encode(texts[: min(len(texts), args.batch_size)])  # warm-up: first-call allocations
    say(f"model loaded and warmed up in {time.perf_counter() - started:.1f}s")
    summary = Summary(args.corpus, command, documents, len(texts), args.batch_size, machine=machine_info(embedder))
    summary.machine["load avg before"] = load_text()

    data_dir = Path(tempfile.mkdtemp(prefix="ragbench-"))
    pg = start_postgres(data_dir)
    try:
        full = args.limit is None and args.corpus.resolve() == DEFAULT_CORPUS.resolve()
        for number in range(1, args.repeat + 1):
            say(f"round {number}/{args.repeat}")
            result = await run_round(number, pg, data_dir, embedder, texts, args, options)
            result.load_average = load_text()
            check_round(result, documents, len(texts), full)
            summary.rounds.append(result)
    finally:
        pg.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.corpus.is_file():
        print(
            f"benchmark data not found: {args.corpus}\n"
            "bench.ingest needs a BEIR corpus.jsonl (default: ../shared/data/msmarco-5k/corpus.jsonl "
            "next to the repository); pass its path as the first argument.",
            file=sys.stderr,
        )
        return 2
    command = shlex.join([".venv/bin/python", "-m", "bench.ingest", *argv])
    summary = asyncio.run(bench(args, command))
    n = summary.chunks
    print()
    print(f"{'':28}{'seconds':>10}{'chunks/s':>12}")
    for r in summary.rounds:
        assert r.ingest is not None and r.rerun is not None
        print(f"round {r.number}: {r.order}")
        print(f"  {'raw SentenceTransformer':26}{r.raw_seconds:>10.1f}{_rate(n, r.raw_seconds):>12.1f}")
        if r.raw_batched_seconds is not None:
            print(
                f"  {'raw, pipeline batches':26}{r.raw_batched_seconds:>10.1f}{_rate(n, r.raw_batched_seconds):>12.1f}"
            )
        print(f"  {'ingest (fresh DB)':26}{r.ingest.seconds:>10.1f}{_rate(n, r.ingest.seconds):>12.1f}")
        print(f"  {'re-run (unchanged)':26}{r.rerun.seconds:>10.2f}")
        print(f"  ratio ingest/raw {r.raw_seconds / r.ingest.seconds:.2f}")
    print()
    publish(SECTION, render(summary), no_write=args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
