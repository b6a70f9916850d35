"""Ingest throughput against the raw encoder, measured side by side in one run.

Per round, in alternating order: raw = `LocalEmbedder.encode` of exactly the chunk texts the
pipeline produces; ingest = `ingest_documents` end to end into a fresh database; re-run = the same
ingest again, every document unchanged (`--diagnose`: also the raw encoder on the pipeline's batches).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _kit as kit
from ingest.loaders import LoadFailure, SourceDocument, discover, load
from ingest.pipeline import IngestOptions, IngestReport, ingest_documents, prepare
from service.embeddings.encoders import LocalEmbedder
from service.postgres.corpus import open_corpus
from service.postgres.documents import DocumentStore, PreparedDocument, WriteResult
from tests.support.servers import fresh_database

DEFAULT_CORPUS = kit.SHARED_DATA / "msmarco-5k" / "corpus.jsonl"
SECTION = "Ingest"
FULL_CORPUS_DOCUMENTS = 5_000
GOAL_RATIO = 0.9
Items = list[SourceDocument | LoadFailure]


class TimedStore(DocumentStore):
    """The real store; adds up the time spent in writes (they overlap embedding)."""

    write_seconds, writes = 0.0, 0

    async def write_documents(self, docs: Sequence[PreparedDocument]) -> WriteResult:
        started = time.perf_counter()
        try:
            return await super().write_documents(docs)
        finally:
            self.write_seconds += time.perf_counter() - started
            self.writes += 1


@dataclass
class Timing:
    seconds: float
    load_seconds: float
    embed_seconds: float
    write_seconds: float
    writes: int
    report: IngestReport


def load_items(corpus: Path, limit: int | None) -> Items:
    """discover + load, exactly as `rag-ingest add PATH --format beir` does."""
    entries, failures = discover([str(corpus)])
    items: Items = [*failures, *(doc for entry in entries for doc in load(entry, "beir"))]
    if limit is not None:
        docs = itertools.islice((i for i in items if isinstance(i, SourceDocument)), limit)
        items = [*(i for i in items if isinstance(i, LoadFailure)), *docs]
    return items


def chunk_texts(items: Items, options: IngestOptions) -> list[str]:
    """The chunk texts the pipeline embeds, in the order it embeds them."""
    seen: set[tuple[str, str]] = set()
    texts: list[str] = []
    for item in items:
        if not isinstance(item, LoadFailure) and (item.source, item.external_id) not in seen:
            seen.add((item.source, item.external_id))
            texts.extend(c.text for c in prepare(item, "", options).chunks)
    return texts


async def timed_ingest(store: TimedStore, embedder: LocalEmbedder, args: Any, options: IngestOptions) -> Timing:
    timed = kit.TimedEmbedder(embedder)
    store.write_seconds, store.writes = 0.0, 0
    started = time.perf_counter()
    items = load_items(args.corpus, args.limit)
    loaded = time.perf_counter()
    report = await ingest_documents(store, timed, items, options)
    seconds = time.perf_counter() - started
    return Timing(seconds, loaded - started, timed.seconds, store.write_seconds, store.writes, report)


def timed_raw(embedder: LocalEmbedder, texts: list[str], batch: int | None = None) -> float:
    """The raw encoder over every text at once, or fed consecutive batches of `batch` as the pipeline does."""
    started = time.perf_counter()
    for start in range(0, len(texts), batch or len(texts)):
        embedder.encode(texts[start : start + (batch or len(texts))])
    return time.perf_counter() - started


async def run_round(
    number: int, servers: kit.Servers, embedder: LocalEmbedder, texts: list[str], args: Any
) -> dict[str, Any]:
    options = IngestOptions(window=args.window)
    raw_first = number % 2 == 1
    order = "raw → ingest → re-run" if raw_first else "ingest → re-run → raw"
    result: dict[str, Any] = {"number": number, "order": order}

    def raw_side() -> None:
        result["raw"] = timed_raw(embedder, texts)
        result["raw_batched"] = timed_raw(embedder, texts, options.window) if args.diagnose else None

    if raw_first:
        raw_side()
    # Creating and migrating the fresh database is setup, not ingest.
    async with (
        fresh_database(servers.admin_dsn, "bench_ingest") as dsn,
        open_corpus(kit.make_settings(dsn, "redis://127.0.0.1:1", servers.data_dir)) as corpus,
    ):
        store = TimedStore(corpus.pool)
        result["ingest"] = await timed_ingest(store, embedder, args, options)
        result["rerun"] = await timed_ingest(store, embedder, args, options)
        result["db"] = [await corpus.pool.fetchval(f"SELECT count(*) FROM {t}") for t in ("documents", "chunks")]
    if not raw_first:
        raw_side()
    result["load_average"] = kit.load_text()
    kit.say(
        f"  raw {result['raw']:.1f} s, ingest {result['ingest'].seconds:.1f} s, re-run {result['rerun'].seconds:.2f} s"
    )
    return result


def check_round(result: dict[str, Any], documents: int, chunks: int, full_corpus: bool) -> None:
    """Sanity: the numbers describe a complete, correct ingest, not a fast broken one."""
    first, again = result["ingest"].report, result["rerun"].report
    problems = [
        f"{len(first.failures)} load failures" if first.failures else "",
        "" if (first.documents, first.added, first.chunks) == (documents, documents, chunks) else f"ingest: {first}",
        "" if first.embeddings_computed == chunks else f"{first.embeddings_computed} embeddings for {chunks} chunks",
        "" if result["db"] == [documents, chunks] else f"the database holds {result['db']} documents / chunks",
        f"expected {FULL_CORPUS_DOCUMENTS} documents" if full_corpus and documents != FULL_CORPUS_DOCUMENTS else "",
        ""
        if (again.unchanged, again.added, again.updated, again.embeddings_computed) == (documents, 0, 0, 0)
        else f"re-run was not a no-op: {again}",
    ]
    if any(problems):
        raise SystemExit("sanity check failed:\n  " + "\n  ".join(p for p in problems if p))


def render(rounds: list[dict[str, Any]], documents: int, n: int, args: Any) -> str:
    import sentence_transformers
    import torch

    raw = statistics.median(r["raw"] for r in rounds)
    ing = statistics.median(r["ingest"].seconds for r in rounds)
    ratio = raw / ing
    per_round = []
    for r in rounds:
        ingest, batched = r["ingest"], "–" if r["raw_batched"] is None else f"{r['raw_batched']:.1f}"
        other = ingest.seconds - ingest.load_seconds - ingest.embed_seconds
        per_round.append(
            f"{r['number']} | {r['order']} | {r['raw']:.1f} | {batched} | {ingest.seconds:.1f} | "
            f"{ingest.load_seconds:.2f} / {ingest.embed_seconds:.1f} / {other:.2f} | "
            f"{ingest.write_seconds:.2f} ({ingest.writes} txns) | {r['raw'] / ingest.seconds:.2f} | "
            f"{r['rerun'].seconds:.2f} | {r['load_average']}"
        )
    versions = {
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "sentence_transformers": sentence_transformers.__version__,
    }
    summary = [f"{documents:,}", f"{n:,}", args.batch_size, f"{n / raw:.1f}", f"{n / ing:.1f}", f"**{ratio:.2f}**"]
    return kit.section(
        args,
        kit.table("documents | chunks | batch size | raw encoder chunks/s | ingest chunks/s | ingest / raw", [summary]),
        f"Goal ingest / raw ≥ {GOAL_RATIO}: **{'met' if ratio >= GOAL_RATIO else 'not met'}** "
        f"(medians of {len(rounds)} rounds; ingest = load + hash + chunk + embed + COPY + index maintenance).",
        kit.table(
            "round | order | raw s | raw, pipeline batches s | ingest s | load / awaiting model / other s "
            "| DB writes (overlapped) | ratio | re-run s | load avg after",
            per_round,
            "rlrrrlrrrl",
        ),
        **versions,
    )


async def bench(args: argparse.Namespace) -> str:
    items = load_items(args.corpus, args.limit)
    if failures := [i for i in items if isinstance(i, LoadFailure)]:
        raise SystemExit(f"{len(failures)} load failures, first: {failures[0]}")
    documents = len({(i.source, i.external_id) for i in items if isinstance(i, SourceDocument)})
    texts = chunk_texts(items, IngestOptions(window=args.window))
    kit.say(f"{args.corpus}: {documents} documents, {len(texts)} chunks")
    embedder = LocalEmbedder(batch_size=args.batch_size)
    embedder.encode(texts[: args.batch_size])  # model load and first-call allocations: excluded from both sides
    rounds = []
    full = args.limit is None and args.corpus.resolve() == DEFAULT_CORPUS.resolve()
    with kit.embedded_servers(None) as servers:
        for number in range(1, args.repeat + 1):
            rounds.append(await run_round(number, servers, embedder, texts, args))
            check_round(rounds[-1], documents, len(texts), full)
    return render(rounds, documents, len(texts), args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.arguments("ingest", __doc__)
    parser.add_argument("corpus", nargs="?", type=Path, default=DEFAULT_CORPUS, help="BEIR corpus.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="only the first N documents")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size, both sides")
    parser.add_argument("--window", type=int, default=1024, help="texts per embedder call (RAG_EMBED_WINDOW)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, alternating the order")
    parser.add_argument("--diagnose", action="store_true", help="also time the raw encoder on the pipeline's batches")
    args = kit.parse(parser, argv, limit=100)
    if args.repeat < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--repeat, --batch-size and --limit must be positive")
    return kit.publish_run(SECTION, bench(args), args, args.corpus)


if __name__ == "__main__":
    raise SystemExit(main())
