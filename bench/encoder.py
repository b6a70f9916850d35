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
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import _kit as kit
from service.embeddings.encoders import LocalEmbedder, OnnxEmbedder
from service.embeddings.model_cache import ensure_exported
from service.settings import LOCAL_EMBEDDING_MODEL

THREADS = 2
MODEL_DIR = kit.RESULTS / "models"


def questions(n: int) -> list[str]:
    quora = kit.jsonl(kit.SHARED_DATA / "quora-pairs-dev" / "pairs.jsonl")
    return [*(q["text"] for q in kit.jsonl(kit.MSMARCO / "queries.jsonl")), *(p[k] for p in quora for k in "ab")][:n]


def passages(n: int) -> list[str]:
    return [p["text"] for p in kit.jsonl(kit.MSMARCO / "corpus.jsonl")[:n]]


def one_at_a_time(encode: Callable[[list[str]], Any], texts: list[str]) -> dict[str, float]:
    encode(texts[:5])  # warm
    latencies = []
    cpu, wall = time.process_time(), time.perf_counter()
    for text in texts:
        started = time.perf_counter()
        encode([text])
        latencies.append(time.perf_counter() - started)
    return result(texts, cpu, wall, latencies)


async def concurrent(embed: Callable[[list[str]], Any], texts: list[str], concurrency: int) -> dict[str, float]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    latencies: list[float] = []

    async def client() -> None:
        while not queue.empty():
            text = queue.get_nowait()
            started = time.perf_counter()
            await embed([text])
            latencies.append(time.perf_counter() - started)

    await embed(texts[:5])  # warm
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return result(texts, cpu, wall, latencies)


def result(texts: list[str], cpu: float, wall: float, latencies: list[float]) -> dict[str, float]:
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    return {
        "cpu_ms_per_query": cpu / len(texts) * 1000,
        "wall_s": wall,
        "per_s": len(texts) / wall,
        "p50_ms": kit.percentile(latencies, 50) * 1000,
        "p99_ms": kit.percentile(latencies, 99) * 1000,
    }


def ingest_rate(encode: Callable[[list[str]], Any], texts: list[str]) -> dict[str, float]:
    encode(texts[:64])  # warm
    cpu, wall = time.process_time(), time.perf_counter()
    encode(texts)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"per_s": len(texts) / wall, "cpu_ms_per_passage": cpu / len(texts) * 1000}


RSS_PROBE = """
import json, sys
from pathlib import Path
from service.embeddings.encoders import LocalEmbedder, OnnxEmbedder
from service.http.app import create_app
from service.settings import LOCAL_EMBEDDING_MODEL, Settings

runtime, model_dir = sys.argv[1], Path(sys.argv[2])
create_app(Settings(_env_file=None, model_dir=model_dir, embedding_runtime=runtime))
if runtime == "onnx":
    embedder = OnnxEmbedder(LOCAL_EMBEDDING_MODEL, model_dir=model_dir, threads=2)
else:
    embedder = LocalEmbedder(threads=2)
embedder.encode(["How do I flush the cache?"])
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
print(json.dumps({
    "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
    "peak_mb": int(status["VmHWM"].split()[0]) / 1024,
    "torch": "torch" in sys.modules,
}))
"""


def rss(runtime: str, model_dir: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, runtime, str(model_dir)],
        cwd=kit.ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"},
    )
    parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


async def main() -> None:
    parser = kit.arguments("encoder", __doc__)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--passages", type=int, default=320)
    args = kit.parse(parser, None, queries=20, concurrency=8, passages=32)

    loads_before = kit.load_text()
    texts = questions(args.queries)
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
        rows.append((f"{name}, one question per encode", one_at_a_time(encode, texts), "1"))
    kit.say(f"ONNX, micro-batched, {args.concurrency} in flight")
    before = (onnx.batcher.encodes, onnx.batcher.encoded)
    batched = await concurrent(onnx.embed, texts, args.concurrency)
    encodes, encoded = onnx.batcher.encodes - before[0], onnx.batcher.encoded - before[1]
    rows.append((f"ONNX fp32, micro-batched, {args.concurrency} in flight", batched, f"{encoded / encodes:.1f}"))
    kit.say(f"torch behind its lock, {args.concurrency} in flight (the encoder before)")
    locked = await concurrent(torch.embed, texts, args.concurrency)
    rows.append((f"torch behind a lock, {args.concurrency} in flight (before)", locked, "1"))

    docs = passages(args.passages)
    kit.say(f"ingest: {len(docs)} passages at batch 64")
    ingest = {"ONNX fp32": ingest_rate(onnx.encode, docs), "torch": ingest_rate(torch.encode, docs)}
    kit.say("resident memory of an API-like process")
    memory = {"ONNX fp32 (no torch)": rss("onnx", MODEL_DIR), "torch": rss("torch", MODEL_DIR)}

    table = kit.table(
        "encoder | CPU ms / query | queries/s | p50 ms | p99 ms | texts / encode",
        [
            (n, f"{r['cpu_ms_per_query']:.1f}", f"{r['per_s']:.0f}", *(f"{r[p]:.1f}" for p in ("p50_ms", "p99_ms")), b)
            for n, r, b in rows
        ],
    )
    ingest_rows = [(n, f"{r['per_s']:.1f}", f"{r['cpu_ms_per_passage']:.1f}") for n, r in ingest.items()]
    memory_rows = [
        (n, f"{m['rss_mb']:.0f}", f"{m['peak_mb']:.0f}", "yes" if m["torch"] else "no") for n, m in memory.items()
    ]
    body = "\n\n".join(
        [
            kit.run_line(args.command, model_threads=THREADS, load_average_before=loads_before),
            f"{len(texts)} questions (msmarco-5k queries, then Quora questions). Worst cosine ONNX vs torch on the "
            f"first 50: {agreement:.7f}.",
            table,
            f"Ingest, {len(docs)} msmarco-5k passages, batch 64:",
            kit.table("runtime | passages/s | CPU ms / passage", ingest_rows),
            "Memory (the app imported and built, the encoder loaded, one encode; each in a fresh process):",
            kit.table("API-like process | RSS MB | peak RSS MB | torch imported", memory_rows),
        ]
    )
    kit.publish("Query encoder", body, args)


if __name__ == "__main__":
    asyncio.run(main())
