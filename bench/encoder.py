"""The query encoder: torch vs ONNX Runtime, one question at a time and micro-batched under concurrency.

Side by side, on the same questions (msmarco-5k queries, then Quora questions): CPU ms per query
(process CPU time / queries: robust on a shared machine, where wall time is not), wall time and
throughput, for torch encoding one question per call, ONNX one per call, and ONNX micro-batched
with `--concurrency` questions in flight (as an API worker sees them), plus torch behind its lock
under the same concurrency (the encoder before). Then passages/s at batch 64 (ingest), and the
resident memory of an API-like process (the app imported and built, the encoder loaded, one
encode done) with each runtime, each in its own fresh process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from bench import _kit as kit
from service.embeddings.encoders import LocalEmbedder, OnnxEmbedder
from service.embeddings.model_cache import ensure_exported
from service.settings import LOCAL_EMBEDDING_MODEL

THREADS = 2
MODEL_DIR = kit.RESULTS / "models"


async def per_query(
    embed: Callable[[list[str]], Awaitable[Any]], texts: list[str], concurrency: int
) -> dict[str, float]:
    """`concurrency` callers embedding one question per call until every text is done: CPU per query and latency."""
    pending, latencies = iter(texts), list[float]()

    async def caller() -> None:
        for text in pending:
            started = time.perf_counter()
            await embed([text])
            latencies.append(time.perf_counter() - started)

    await embed(texts[:5])  # warm
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "cpu_ms_per_query": cpu / len(texts) * 1000,
        "per_s": len(texts) / wall,
        "p50_ms": kit.percentile(latencies, 50) * 1000,
        "p99_ms": kit.percentile(latencies, 99) * 1000,
    }


def blocking(encode: Callable[[list[str]], Any]) -> Callable[[list[str]], Awaitable[Any]]:
    """`encode` called in the event loop's thread, as one question per call does (no thread hop, no batching)."""

    async def call(texts: list[str]) -> Any:
        return encode(texts)

    return call


def ingest_rate(encode: Callable[[list[str]], Any], texts: list[str]) -> dict[str, float]:
    encode(texts[:64])  # warm
    cpu, wall = time.process_time(), time.perf_counter()
    encode(texts)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"per_s": len(texts) / wall, "cpu_ms_per_passage": cpu / len(texts) * 1000}


RSS_SETUP = """
from pathlib import Path
from service.embeddings.encoders import LocalEmbedder, OnnxEmbedder
from service.http.app import create_app
from service.settings import LOCAL_EMBEDDING_MODEL, Settings

model_dir = Path({model_dir!r})
create_app(Settings(_env_file=None, model_dir=model_dir, embedding_runtime={runtime!r}))
if {runtime!r} == "onnx":
    embedder = OnnxEmbedder(LOCAL_EMBEDDING_MODEL, model_dir=model_dir, threads=2)
else:
    embedder = LocalEmbedder(threads=2)
embedder.encode(["How do I flush the cache?"])
"""


async def main() -> None:
    parser = kit.arguments("encoder", __doc__)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--passages", type=int, default=320)
    args = kit.parse(parser, None, queries=20, concurrency=8, passages=32)

    loads_before = kit.load_text()
    quora = kit.jsonl(kit.SHARED_DATA / "quora-pairs-dev" / "pairs.jsonl")
    msmarco = [q["text"] for q in kit.jsonl(kit.MSMARCO / "queries.jsonl")]
    texts = [*msmarco, *(p[k] for p in quora for k in "ab")][: args.queries]
    kit.say(f"exporting (once) / loading the models; {len(texts)} questions")
    ensure_exported(MODEL_DIR)
    onnx = OnnxEmbedder(LOCAL_EMBEDDING_MODEL, model_dir=MODEL_DIR, threads=THREADS)
    onnx.encode(["warm"])
    torch = LocalEmbedder(threads=THREADS)
    torch.encode(["warm"])
    agreement = float(np.min(np.sum(onnx.encode(texts[:50]) * torch.encode(texts[:50]), axis=1)))

    rows: list[tuple[str, dict[str, float], str]] = []
    for name, encode in (("torch", torch.encode), ("ONNX fp32", onnx.encode)):
        kit.say(f"{name}, one question per encode")
        rows.append((f"{name}, one question per encode", await per_query(blocking(encode), texts, 1), "1"))
    kit.say(f"ONNX, micro-batched, {args.concurrency} in flight")
    before = (onnx.batcher.encodes, onnx.batcher.encoded)
    batched = await per_query(onnx.embed, texts, args.concurrency)
    encodes, encoded = onnx.batcher.encodes - before[0], onnx.batcher.encoded - before[1]
    rows.append((f"ONNX fp32, micro-batched, {args.concurrency} in flight", batched, f"{encoded / encodes:.1f}"))
    kit.say(f"torch behind its lock, {args.concurrency} in flight (the encoder before)")
    locked = await per_query(torch.embed, texts, args.concurrency)
    rows.append((f"torch behind a lock, {args.concurrency} in flight (before)", locked, "1"))

    docs = [p["text"] for p in kit.jsonl(kit.MSMARCO / "corpus.jsonl")[: args.passages]]
    kit.say(f"ingest: {len(docs)} passages at batch 64")
    ingest = {"ONNX fp32": ingest_rate(onnx.encode, docs), "torch": ingest_rate(torch.encode, docs)}
    kit.say("resident memory of an API-like process")
    memory = {
        name: kit.child_memory(RSS_SETUP.format(runtime=runtime, model_dir=str(MODEL_DIR)))
        for name, runtime in (("ONNX fp32 (no torch)", "onnx"), ("torch", "torch"))
    }

    query_rows = [
        (n, f"{r['cpu_ms_per_query']:.1f}", f"{r['per_s']:.0f}", *(f"{r[p]:.1f}" for p in ("p50_ms", "p99_ms")), b)
        for n, r, b in rows
    ]
    ingest_rows = [(n, f"{r['per_s']:.1f}", f"{r['cpu_ms_per_passage']:.1f}") for n, r in ingest.items()]
    memory_rows = [
        (n, f"{m['rss_mb']:.0f}", f"{m['peak_mb']:.0f}", "yes" if m["torch"] else "no") for n, m in memory.items()
    ]
    body = kit.section(
        args,
        f"{len(texts)} questions (msmarco-5k queries, then Quora questions). Worst cosine ONNX vs torch on the "
        f"first 50: {agreement:.7f}.",
        kit.table("encoder | CPU ms / query | queries/s | p50 ms | p99 ms | texts / encode", query_rows),
        f"Ingest, {len(docs)} msmarco-5k passages, batch 64:",
        kit.table("runtime | passages/s | CPU ms / passage", ingest_rows),
        "Memory (the app imported and built, the encoder loaded, one encode; each in a fresh process):",
        kit.table("API-like process | RSS MB | peak RSS MB | torch imported", memory_rows),
        model_threads=THREADS,
        load_average_before=loads_before,
    )
    kit.publish("Query encoder", body, args)


if __name__ == "__main__":
    asyncio.run(main())
