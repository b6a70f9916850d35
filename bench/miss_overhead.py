"""Miss-path overhead: request → provider call, with msmarco-5k loaded, next to the bare embedding.

    python -m bench.miss_overhead [DATA_DIR] [--passes 5] [--fresh] [--no-write]

DATA_DIR defaults to ../shared/data/msmarco-5k (BEIR layout: corpus.jsonl, queries.jsonl).
The corpus is ingested with the local MiniLM model into an embedded Postgres kept under
bench/results/miss_overhead/ (gitignored), so only the first run pays the few minutes of
embedding; later runs re-check content hashes and embed nothing (`--fresh` starts over).

One process, one event loop for the app and the client: the real app (`create_app`, real
settings, the local embedder) on a real uvicorn server on loopback, called with an API key
created without `rpm` or `tokens_per_day` (the default path: no rate-limit call to Redis), the Anthropic wire
protocol answered by `tests.support.provider_server.ProviderServer` (a thread of this process,
real `anthropic` SDK inside the app). Per query and pass, in rotating order:

- end to end, cache "use" (a real miss: our Redis keys are flushed first): monotonic time
  from just before the client sends the request to the provider server recording the call
  (`CallRecord.started_at`, the same clock) — guardrails, cache look-up, coalescing lease,
  embed, retrieve, route, prompt, the SDK's request;
- end to end, cache "bypass" (no cache read, no lease);
- the AnswerService steps called directly: `guard`, `cache.get` (a miss), `retrieve`
  (embed + hybrid search), and inside it `retriever.search` alone, then `plan` (prompt + route);
- the bare embedding: `await embedder.embed([question])` and the blocking
  `embedder.encode([question])` (no thread hop);
- an HTTP round trip to `/health` on the same server (what HTTP + client cost by themselves).

One unmeasured pass warms everything first. p50/p99 over all passes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    SHARED_DATA,
    bearer,
    create_key,
    load_text,
    machine_line,
    make_settings,
    markdown_table,
    ms,
    nproc,
    percentile,
    publish,
    revision,
    say,
    serve_in_process,
    sse_events,
    today,
)

DEFAULT_DATA = SHARED_DATA / "msmarco-5k"
DB_DIR = RESULTS / "miss_overhead"
EXPECTED_DOCUMENTS = 5_000
GOAL_P50_S = 0.015
SECTION = "Miss-path overhead"

# Row order of the report: (key, label).
ROWS: list[tuple[str, str]] = [
    ("e2e_use", "**request → provider call, cache `use` (miss)**"),
    ("e2e_bypass", "request → provider call, cache `bypass`"),
    ("guard", "step: `guard` (guardrails, cache key)"),
    ("cache_get", "step: `cache.get` (miss)"),
    ("semantic", "step: `semantic_lookup` (embeds the question, searches the semantic index)"),
    ("retrieve", "step: `retrieve` (hybrid search; embeds only if no vector yet)"),
    ("search", "  `retriever.search` alone (same vector, called directly)"),
    ("plan", "step: `plan` (prompt + route)"),
    ("steps_sum", "sum of the steps above, in pipeline order"),
    ("embed", "**bare `await embedder.embed([question])`**"),
    ("encode", "bare `embedder.encode([question])` (blocking, no thread hop)"),
    ("health", "HTTP round trip `GET /health` (client + uvicorn + FastAPI)"),
]


# What the timeline of the end-to-end cache-"use" requests is made of: thin wrappers around the
# running app's objects (instance attributes, no service code changes) note when each call
# starts (↓) and ends (↑). Consecutive marks give exclusive intervals that add up to the total.
# (owner path from the AnswerService, method, label); missing owners/methods are skipped.
PROBES: list[tuple[str, str, str]] = [
    ("", "guard", "guard"),
    ("cache", "get", "cache.get"),
    ("", "semantic_lookup", "semantic_lookup"),
    ("semantic", "candidates", "semantic.candidates"),
    ("coalescer", "lead", "coalescer.lead"),
    ("", "retrieve", "retrieve"),
    ("embedder", "embed", "embed"),
    ("retriever", "search", "retriever.search"),
    ("", "plan", "plan"),
]


class Probe:
    """Timestamped marks of the current request (requests run one at a time)."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, str]] = []
        self._seen: dict[str, int] = {}

    def reset(self, at: float) -> None:
        self.marks = [(at, "request sent")]
        self._seen = {}

    def note(self, label: str) -> None:
        count = self._seen[label] = self._seen.get(label, 0) + 1
        self.marks.append((time.monotonic(), label if count == 1 else f"{label} #{count}"))

    def wrap(self, owner: Any, name: str, label: str) -> bool:
        original = getattr(owner, name, None) if owner is not None else None
        if original is None:
            return False
        note = self.note
        if asyncio.iscoroutinefunction(original):

            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                note(f"{label} ↓")
                try:
                    return await original(*args, **kwargs)
                finally:
                    note(f"{label} ↑")

            setattr(owner, name, async_wrapper)
        else:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                note(f"{label} ↓")
                try:
                    return original(*args, **kwargs)
                finally:
                    note(f"{label} ↑")

            setattr(owner, name, wrapper)
        return True

    def intervals(self, call_at: float) -> list[tuple[str, float]]:
        marks = sorted([*(m for m in self.marks if m[0] <= call_at), (call_at, "provider call")])
        return [(f"{a} → {b}", tb - ta) for (ta, a), (tb, b) in itertools.pairwise(marks)]


class _EmbedderView:
    """The app's embedder with its calls noted; the bare measurements use the real object."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.model, self.dim = inner, inner.model, inner.dim

    async def embed(self, texts: Sequence[str]) -> Any:
        return await self.inner.embed(texts)


@dataclass
class Samples:
    values: dict[str, list[float]] = field(default_factory=lambda: {key: [] for key, _ in ROWS})
    timeline: dict[str, list[float]] = field(default_factory=dict)  # interval label → seconds
    timeline_order: dict[str, list[int]] = field(default_factory=dict)  # interval label → positions
    errors: list[str] = field(default_factory=list)

    def add(self, key: str, seconds: float) -> None:
        self.values[key].append(seconds)


def load_queries(data: Path) -> list[tuple[str, str]]:
    queries = []
    with (data / "queries.jsonl").open() as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                queries.append((str(row["_id"]), str(row["text"])))
    return queries


async def ensure_corpus(settings: Any, embedder: Any, corpus: Path) -> str:
    """Ingest (idempotent) and check the corpus is complete; returns a one-line description."""
    from bench.common import ingest_path
    from service.postgres.corpus import open_corpus

    started = time.perf_counter()
    report = await ingest_path(settings, embedder, corpus, fmt="beir")
    seconds = time.perf_counter() - started
    async with open_corpus(settings) as opened:
        documents = int(await opened.pool.fetchval("SELECT count(*) FROM documents"))
        chunks = int(await opened.pool.fetchval("SELECT count(*) FROM chunks"))
    if documents != EXPECTED_DOCUMENTS and corpus.parent.name == "msmarco-5k":
        raise SystemExit(f"expected {EXPECTED_DOCUMENTS} documents in the corpus, found {documents}")
    how = (
        f"ingested now in {seconds:.0f} s"
        if report.added or report.updated
        else f"reused from `bench/results/miss_overhead/` (re-check {seconds:.1f} s)"
    )
    say(f"corpus: {documents} documents, {chunks} chunks ({how})")
    return f"{documents:,} documents, {chunks:,} chunks, {how}"


async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await call()
    return time.perf_counter() - started, result


async def run(args: argparse.Namespace, command: str) -> str:
    import httpx
    import redis.asyncio as aioredis
    from pydantic import SecretStr

    from service.answer.pipeline import AnswerService
    from service.answer.schemas import RagRequest
    from service.embedded import start_postgres, start_valkey
    from service.embeddings.encoders import LocalEmbedder
    from service.http.app import create_app
    from service.postgres.corpus import open_corpus
    from tests.support.provider_server import ProviderServer

    queries = load_queries(args.data)
    loads_before = load_text()
    if args.fresh:
        shutil.rmtree(DB_DIR, ignore_errors=True)
    DB_DIR.mkdir(parents=True, exist_ok=True)
    say(f"embedded Postgres + Valkey under {DB_DIR}")
    pg = start_postgres(DB_DIR)
    valkey = start_valkey(DB_DIR)
    provider = ProviderServer().start()
    try:
        settings = make_settings(
            pg.url,
            valkey.url,
            DB_DIR,
            anthropic_api_key=SecretStr("sk-ant-bench"),
            anthropic_base_url=provider.base_url,
        )
        embedder = LocalEmbedder()
        started = time.perf_counter()
        embedder.encode(["warm up"])
        say(f"model loaded in {time.perf_counter() - started:.1f}s; ingesting {args.data / 'corpus.jsonl'}")
        corpus_line = await ensure_corpus(settings, embedder, args.data / "corpus.jsonl")
        token = await create_key(pg.url, "bench-miss-overhead")

        redis = aioredis.from_url(valkey.url)
        await redis.flushdb()  # a clean slate: no answers, no semantic-index rows from earlier runs
        async with open_corpus(settings) as opened:
            if await opened.pool.fetchval("SELECT to_regclass('semantic_cache') IS NOT NULL"):
                await opened.pool.execute("DELETE FROM semantic_cache")
        samples = Samples()
        app = create_app(settings, embedder=embedder)
        async with (
            serve_in_process(app) as base,
            httpx.AsyncClient(base_url=base, timeout=60.0, headers=bearer(token)) as client,
        ):
            service: AnswerService = app.state.resources.answers
            probe = Probe()
            service.embedder = _EmbedderView(service.embedder)
            probed = [
                label
                for path, name, label in PROBES
                if probe.wrap(getattr(service, path, None) if path else service, name, label)
            ]
            say(f"probing {', '.join(probed)}")
            timeline: list[tuple[str, float]] = []

            async def forget(question: str) -> None:
                """Make this question a miss again: drop its answer and its semantic-index row only."""
                key = service.guard(RagRequest(question=question)).key
                await service.redis.answer_cache.delete(key)
                semantic = getattr(service, "semantic", None)
                if semantic is not None:
                    await semantic.forget(key)

            async def end_to_end(question: str, mode: str) -> float:
                if mode == "use":
                    await forget(question)
                before = len(provider.calls)
                sent = time.monotonic()
                probe.reset(sent)
                response = await client.post("/rag/stream", json={"question": question, "cache": mode})
                calls = [c for c in provider.calls[before:] if c.route == "messages"]
                events = sse_events(response.content)
                outcome = events[0][1].get("cache") if events else None
                expected = "miss" if mode == "use" else "bypass"
                if response.status_code != 200 or outcome != expected or events[-1][0] != "done" or len(calls) != 1:
                    raise RuntimeError(
                        f"{mode}: status {response.status_code}, cache {outcome}, {len(calls)} provider calls, "
                        f"last event {events[-1][0] if events else None}: {response.content[:200]!r}"
                    )
                timeline[:] = probe.intervals(calls[0].started_at)
                return calls[0].started_at - sent

            async def steps(question: str) -> dict[str, float]:
                """The AnswerService's steps before generation, called directly, in its order."""
                await forget(question)
                request = RagRequest(question=question, cache="use")
                out: dict[str, float] = {}
                started = time.perf_counter()
                checked = service.guard(request)
                out["guard"] = time.perf_counter() - started
                out["cache_get"], hit = await timed(lambda: service.redis.answer_cache.get(checked.key))
                if hit is not None:
                    raise RuntimeError("steps: unexpected cache hit")
                lookup = getattr(service, "semantic_lookup", None)
                if lookup is not None:
                    out["semantic"], similar = await timed(lambda: lookup(checked))
                    if similar is not None:
                        raise RuntimeError("steps: unexpected semantic hit")
                out["retrieve"], sources = await timed(lambda: service.retrieve(checked))
                started = time.perf_counter()
                service.plan(checked, sources)
                out["plan"] = time.perf_counter() - started
                out["steps_sum"] = sum(out.values())
                vector = (await embedder.embed([checked.text]))[0]
                out["search"], _ = await timed(
                    lambda: service.retriever.search(vector, checked.text, top_k=request.top_k, filters=checked.filters)
                )
                return out

            async def bare(question: str) -> dict[str, float]:
                embed_s, _ = await timed(lambda: embedder.embed([question]))
                started = time.perf_counter()
                embedder.encode([question])
                return {"embed": embed_s, "encode": time.perf_counter() - started}

            async def health() -> float:
                seconds, response = await timed(lambda: client.get("/health"))
                if response.status_code != 200:
                    raise RuntimeError(f"/health: {response.status_code}")
                return float(seconds)

            async def one(kind: str, question: str, record: bool) -> None:
                if kind in ("use", "bypass"):
                    value = await end_to_end(question, kind)
                    if record:
                        samples.add(f"e2e_{kind}", value)
                        if kind == "use":
                            for position, (label, seconds) in enumerate(timeline):
                                samples.timeline.setdefault(label, []).append(seconds)
                                samples.timeline_order.setdefault(label, []).append(position)
                elif kind == "steps":
                    for key, value in (await steps(question)).items():
                        if record:
                            samples.add(key, value)
                elif kind == "bare":
                    for key, value in (await bare(question)).items():
                        if record:
                            samples.add(key, value)
                else:
                    value = await health()
                    if record:
                        samples.add("health", value)

            kinds = ["use", "bypass", "steps", "bare", "health"]
            for number in range(args.passes + 1):
                record = number > 0
                say(f"pass {number}/{args.passes}" + ("" if record else " (warm-up, not recorded)"))
                for index, (_qid, question) in enumerate(queries):
                    shift = (index + number) % len(kinds)  # rotate the order: drift hits every measure
                    for kind in kinds[shift:] + kinds[:shift]:
                        try:
                            await one(kind, question, record)
                        except RuntimeError as exc:
                            samples.errors.append(str(exc))
                            if len(samples.errors) > 10:
                                raise SystemExit("too many errors:\n  " + "\n  ".join(samples.errors)) from exc
        await redis.flushdb()
        await redis.aclose()
        return render(samples, args, command, corpus_line, len(queries), (loads_before, load_text()))
    finally:
        provider.stop()
        valkey.stop()
        pg.stop()


def render(
    samples: Samples, args: argparse.Namespace, command: str, corpus: str, queries: int, loads: tuple[str, str]
) -> str:
    values = samples.values
    embed50 = percentile(values["embed"], 50)
    rows = []
    for key, label in ROWS:
        data = values[key]
        p50, p99 = percentile(data, 50), percentile(data, 99)
        rows.append([label, str(len(data)), ms(p50), ms(p99), f"{p50 / embed50:.1f}×" if data else "–"])
    segment_rows = []
    order = sorted(samples.timeline, key=lambda label: statistics.median(samples.timeline_order[label]))
    omitted = 0
    for label in order:
        data = samples.timeline[label]
        if percentile(data, 99) < 0.0001:
            omitted += 1  # the glue between two calls, e.g. "guard ↑ → cache.get ↓"
            continue
        segment_rows.append([label, str(len(data)), ms(percentile(data, 50)), ms(percentile(data, 99))])
    if omitted:
        segment_rows.append([f"({omitted} more intervals between calls, each p99 < 0.1 ms)", "", "", ""])
    e2e = percentile(values["e2e_use"], 50)
    over = e2e - embed50
    verdict = "met" if e2e <= GOAL_P50_S else "not met"
    import torch

    lines = [
        f"Command: `{command}`  ",
        f"Date: {today()}, commit {revision()}  ",
        f"Machine: {machine_line()}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"load average (1/5/15 min) before {loads[0]}, after {loads[1]}  ",
        f"Corpus: msmarco-5k, {corpus}; {queries} queries × {args.passes} passes after one warm-up pass; "
        "local all-MiniLM-L6-v2; provider = `tests.support.provider_server.ProviderServer` (Anthropic wire, real SDK); "
        "app, uvicorn, client (httpx) and provider server in one process and one clock.",
        "",
        markdown_table(["measure", "n", "p50 ms", "p99 ms", "p50 / bare embed"], rows, "lrrrr"),
        "",
        "Timeline of the cache-`use` requests of the first row: the running AnswerService's calls "
        "(↓ start, ↑ end, noted by wrappers around its methods and its embedder, cache, coalescer, "
        "retriever); consecutive marks, so the intervals add up to the total:",
        "",
        markdown_table(["interval", "n", "p50 ms", "p99 ms"], segment_rows, "lrrr"),
        "",
        f"Goal p50 ≤ {GOAL_P50_S * 1000:.0f} ms (request → provider call, cache `use`, miss): **{ms(e2e)} ms, "
        f"{verdict}**; of that, the bare embedding is {ms(embed50)} ms and everything else {ms(over)} ms (p50s).",
    ]
    if samples.errors:
        lines += ["", f"Errors ({len(samples.errors)}): " + "; ".join(f"`{e[:160]}`" for e in samples.errors[:3])]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.miss_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="BEIR folder (corpus + queries)")
    parser.add_argument("--passes", type=int, default=5, help="measured passes over the queries (default 5)")
    parser.add_argument("--fresh", action="store_true", help="drop the cached database and ingest again")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.passes < 1:
        parser.error("--passes must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not (args.data / "corpus.jsonl").is_file() or not (args.data / "queries.jsonl").is_file():
        print(f"benchmark data not found under {args.data} (need corpus.jsonl and queries.jsonl)", file=sys.stderr)
        return 2
    command = shlex.join([".venv/bin/python", "-m", "bench.miss_overhead", *argv])
    say(f"{nproc()} CPUs, load average {load_text()}")
    publish(SECTION, asyncio.run(run(args, command)), no_write=args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
