"""Reranking the dense top N with the only packaged reranker found (nanoranker): nDCG@10 lift and cost.

    pip install nanoranker onnxruntime-extensions   # not a dependency of the project

nanoranker's wheel holds a Universal Sentence Encoder and a small network over the concatenated
query and passage embeddings (plus character n-gram hashes): a bi-encoder feature model, not a
cross-encoder. Each judged query's dense top N (the service's `Retriever`) is reordered by it; the
latency is the reranking call alone. The service ships no reranker: see docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from bench import _kit as kit
from bench.retrieval import SETS
from ingest import metrics
from ingest.beir import load
from ingest.scratch import scratch_corpus
from service.embeddings.encoders import create_embedder
from service.postgres.db import create_pool
from service.postgres.retrieval import Retriever


async def evaluate(data_dir: Path, candidates: int, keep: Path | None) -> list[str]:
    import nanoranker  # type: ignore[import-not-found]

    dataset = load(data_dir)
    base = kit.make_settings("postgresql://scratch", "redis://127.0.0.1:1", Path("."))
    work = keep / data_dir.name if keep else None
    async with scratch_corpus(base, data_dir / "corpus.jsonl", keep=work) as (settings, _):
        embedder = create_embedder(settings)
        pool = await create_pool(str(settings.database_url), min_size=1, max_size=1)
        names = {r["id"]: r["external_id"] for r in await pool.fetch("SELECT id, external_id FROM documents")}
        retriever, dense, reranked, seconds = Retriever(pool), [], [], []
        nanoranker.rank("warm", ["up", "now"])
        for q in dataset.queries:
            vector = (await embedder.embed([q.text]))[0]
            sources = await retriever.search(vector, q.text, top_k=candidates, mode="dense")
            started = time.perf_counter()
            order = nanoranker.rank(q.text, [s.text for s in sources], top_n=len(sources))
            seconds.append(1000 * (time.perf_counter() - started))
            doc_of = {s.text: names[s.document_id] for s in reversed(sources)}
            dense.append(metrics.ndcg(list(dict.fromkeys(names[s.document_id] for s in sources)), q.judgments))
            reranked.append(metrics.ndcg(list(dict.fromkeys(doc_of[text] for text, _ in order)), q.judgments))
        await pool.close()
    diff, low, high = metrics.paired_bootstrap(dense, reranked)
    return [
        data_dir.name,
        str(candidates),
        f"{metrics.mean(dense):.3f}",
        f"{metrics.mean(reranked):.3f}",
        f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]",
        f"{kit.percentile(seconds, 50):.0f} / {kit.percentile(seconds, 99):.0f}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.arguments("reranker", __doc__)
    parser.add_argument("data_dirs", type=Path, nargs="*", default=list(SETS), help="BEIR folders")
    parser.add_argument("--candidates", type=int, default=30, help="dense candidates reranked per query")
    parser.add_argument("--keep", type=Path, default=None, help="folder for the databases, kept and reused")
    args = kit.parse(parser, argv)
    rows = [asyncio.run(evaluate(d, args.candidates, args.keep)) for d in args.data_dirs]
    header = "data | N | dense nDCG@10 | reranked | Δ [95 % CI] | rerank ms p50 / p99"
    kit.publish("Reranker", kit.section(args, kit.table(header, rows)), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
