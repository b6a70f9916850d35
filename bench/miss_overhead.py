"""Miss-path overhead: request → provider call, with msmarco-5k loaded, next to the bare embedding.

The real app on uvicorn in this process (the serving embedder of `create_embedder`, real settings, an
API key without `rpm`), the provider server in a thread, one clock. The corpus is the replay benchmarks'
(ingested once with `rag-ingest` into the kit's embedded Postgres, then reused). Per query and pass, in
rotating order: end to end with cache "use" (a real miss) and "bypass", measured from just before the
request is sent to the provider server recording the call; the AnswerService's steps called directly;
the bare embedding; and a `GET /health` round trip. Wrappers around the running service's methods give
a timeline of the "use" requests. One unmeasured pass warms everything first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import _kit as kit
from tests.support.servers import serve_app

GOAL_P50_S = 0.010
SECTION = "Miss-path overhead"

# Row order of the report: (key, label).
ROWS: list[tuple[str, str]] = [
    ("e2e_use", "**request → provider call, cache `use` (miss)**"),
    ("e2e_bypass", "request → provider call, cache `bypass`"),
    ("guard", "step: `guard` (guardrails, cache key)"),
    ("cache_get", "step: `cache.get` (miss)"),
    ("semantic", "step: `semantic_lookup` (embeds the question, searches the semantic index)"),
    ("retrieve", "step: `retrieve` (search; embeds only if no vector yet)"),
    ("search", "  `retriever.search` alone (same vector, called directly)"),
    ("plan", "step: `plan` (prompt + route)"),
    ("steps_sum", "sum of the steps above, in pipeline order"),
    ("embed", "bare `await embedder.embed([question])` (micro-batcher, thread hop)"),
    ("encode", "**bare `embedder.encode([question])`** (blocking, no thread hop)"),
    ("health", "HTTP round trip `GET /health` (client + uvicorn + FastAPI)"),
]


# What the timeline of the end-to-end cache-"use" requests is made of: thin wrappers around the
# running app's objects (instance attributes, no service code changes) note when each call
# starts (↓) and ends (↑). Consecutive marks give exclusive intervals that add up to the total.
# (owner path from the AnswerService, method, label); missing owners/methods are skipped.
PROBES: list[tuple[str, str, str]] = [
    ("questions", "guard", "guard"),
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

        @contextlib.contextmanager
        def marked() -> Iterator[None]:
            self.note(f"{label} ↓")
            try:
                yield
            finally:
                self.note(f"{label} ↑")

        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            with marked():
                return await original(*args, **kwargs)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with marked():
                return original(*args, **kwargs)

        setattr(owner, name, async_wrapper if asyncio.iscoroutinefunction(original) else wrapper)
        return True

    def intervals(self, call_at: float) -> list[tuple[str, float]]:
        marks = sorted([*(m for m in self.marks if m[0] <= call_at), (call_at, "provider call")])
        return [(f"{a} → {b}", tb - ta) for (ta, a), (tb, b) in itertools.pairwise(marks)]


@dataclass
class Samples:
    values: dict[str, list[float]] = field(default_factory=lambda: {key: [] for key, _ in ROWS})
    timeline: dict[str, list[float]] = field(default_factory=dict)  # interval label → seconds
    timeline_order: dict[str, list[int]] = field(default_factory=dict)  # interval label → positions
    errors: list[str] = field(default_factory=list)


async def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds `call()` took (awaited if it returns an awaitable), and its result."""
    started = time.perf_counter()
    result = call()
    result = await result if inspect.isawaitable(result) else result
    return time.perf_counter() - started, result


async def run(args: argparse.Namespace) -> str:
    from pydantic import SecretStr

    from service.answer.pipeline import AnswerService
    from service.answer.schemas import RagRequest
    from service.embeddings.encoders import create_embedder
    from service.http.app import create_app
    from tests.support.provider_server import ProviderServer

    queries = [str(r["text"]) for r in kit.jsonl(kit.MSMARCO / "queries.jsonl")][: args.queries]
    with kit.embedded_servers() as db, ProviderServer() as provider:
        dsn, documents = await kit.ensure_corpus(db, args.limit_corpus)
        chunks = await kit.fetchval(dsn, "SELECT count(*) FROM chunks")
        api_key = SecretStr("sk-ant-bench")
        settings = kit.make_settings(
            dsn, db.redis_base, kit.DATA_DIR, anthropic_api_key=api_key, anthropic_base_url=provider.base_url
        )
        embedder: Any = create_embedder(settings)  # the local ONNX encoder (has `encode`)
        embedder.encode(["warm up"])
        token = await kit.create_key(dsn)
        await kit.fresh_caches(dsn, db.redis_base)  # a clean slate: no answers, no semantic-index rows
        samples = Samples()
        app = create_app(settings, embedder=embedder)
        async with serve_app(app) as base:
            client = kit.Client(base, kit.bearer(token))
            service: AnswerService = app.state.resources.answers
            probe = Probe()
            service.embedder = kit.TimedEmbedder(service.embedder)  # probed; the bare measures use the real one
            probed = [
                label
                for path, name, label in PROBES
                if probe.wrap(getattr(service, path, None) if path else service, name, label)
            ]
            kit.say(f"probing {', '.join(probed)}")
            timeline: list[tuple[str, float]] = []

            async def forget(question: str) -> None:
                """Make this question a miss again: drop its answer and its semantic-index row only."""
                key = service.questions.guard(RagRequest(question=question)).key
                await service.cache.delete(key)
                if service.semantic is not None:
                    await service.semantic.forget(key)

            async def end_to_end(question: str, mode: str) -> dict[str, float]:
                if mode == "use":
                    await forget(question)
                before = len(provider.calls)
                sent = time.monotonic()
                probe.reset(sent)
                reply = await client.request("POST", "/rag/stream", {"question": question, "cache": mode})
                calls = [c for c in provider.calls[before:] if c.route == "messages"]
                if not reply.ok or reply.outcome != ("miss" if mode == "use" else "bypass") or len(calls) != 1:
                    raise RuntimeError(f"{mode}: {reply.outcome}, {len(calls)} provider calls: {reply.body[:200]!r}")
                timeline[:] = probe.intervals(calls[0].started_at)
                return {f"e2e_{mode}": calls[0].started_at - sent}

            async def steps(question: str) -> dict[str, float]:
                """The AnswerService's steps before generation, called directly, in its order."""
                await forget(question)
                request = RagRequest(question=question, cache="use")
                out: dict[str, float] = {}
                out["guard"], checked = await timed(lambda: service.questions.guard(request))
                out["cache_get"], hit = await timed(lambda: service.cache.get(checked.key))
                if hit is not None:
                    raise RuntimeError("steps: unexpected cache hit")
                out["semantic"], similar = await timed(lambda: service.semantic_lookup(checked))
                if similar is not None:
                    raise RuntimeError("steps: unexpected semantic hit")
                out["retrieve"], sources = await timed(lambda: service.retrieve(checked))
                out["plan"], _ = await timed(lambda: service.plan(checked, sources))
                out["steps_sum"] = sum(out.values())
                vector = (await embedder.embed([checked.text]))[0]
                out["search"], _ = await timed(
                    lambda: service.retriever.search(vector, checked.text, top_k=request.top_k, filters=checked.filters)
                )
                return out

            async def bare(question: str) -> dict[str, float]:
                embed_s, _ = await timed(lambda: embedder.embed([question]))
                encode_s, _ = await timed(lambda: embedder.encode([question]))
                return {"embed": embed_s, "encode": encode_s}

            async def health(_question: str) -> dict[str, float]:
                reply = await client.request("GET", "/health")
                if reply.status != 200:
                    raise RuntimeError(f"/health: {reply.status} {reply.error}")
                return {"health": reply.total_s}

            measures: dict[str, Callable[[str], Awaitable[dict[str, float]]]] = {
                "use": lambda q: end_to_end(q, "use"),
                "bypass": lambda q: end_to_end(q, "bypass"),
                "steps": steps,
                "bare": bare,
                "health": health,
            }
            kinds = list(measures)
            for number in range(args.passes + 1):
                record = number > 0
                kit.say(f"pass {number}/{args.passes}" + ("" if record else " (warm-up, not recorded)"))
                for index, question in enumerate(queries):
                    shift = (index + number) % len(kinds)  # rotate the order: drift hits every measure
                    for kind in kinds[shift:] + kinds[:shift]:
                        try:
                            values = await measures[kind](question)
                        except RuntimeError as exc:
                            samples.errors.append(str(exc))
                            if len(samples.errors) > 10:
                                raise SystemExit("too many errors:\n  " + "\n  ".join(samples.errors)) from exc
                            continue
                        for key, value in values.items() if record else ():
                            samples.values[key].append(value)
                        for position, (label, seconds) in enumerate(timeline if record and kind == "use" else ()):
                            samples.timeline.setdefault(label, []).append(seconds)
                            samples.timeline_order.setdefault(label, []).append(position)
            client.close()
        await kit.fresh_caches(dsn, db.redis_base)
        return render(samples, args, f"{documents:,} documents, {chunks:,} chunks", len(queries))


def render(samples: Samples, args: argparse.Namespace, corpus: str, queries: int) -> str:
    import onnxruntime

    values = samples.values
    embed50 = kit.percentile(values["encode"], 50)
    rows = []
    for key, label in ROWS:
        p50, p99 = kit.percentile(values[key], 50), kit.percentile(values[key], 99)
        rows.append(
            [label, len(values[key]), kit.ms(p50), kit.ms(p99), f"{p50 / embed50:.1f}×" if values[key] else "–"]
        )
    order = sorted(samples.timeline, key=lambda label: statistics.median(samples.timeline_order[label]))
    # the glue between two calls (e.g. "guard ↑ → cache.get ↓", p99 < 0.1 ms) is left out
    segments = [
        [label, len(d), kit.ms(kit.percentile(d, 50)), kit.ms(kit.percentile(d, 99))]
        for label in order
        if kit.percentile(d := samples.timeline[label], 99) >= 0.0001
    ]
    e2e = kit.percentile(values["e2e_use"], 50)
    errors = "".join(f"; `{e[:160]}`" for e in samples.errors[:3])
    return kit.section(
        args,
        f"Corpus: {corpus}; {queries} queries × {args.passes} passes after a warm-up pass; app, uvicorn, "
        "client and provider server in one process and one clock.",
        kit.table("measure | n | p50 ms | p99 ms | p50 / bare encode", rows),
        "Timeline of the cache-`use` requests (↓ start, ↑ end of the running service's calls; intervals "
        "between consecutive marks add up to the total, those with p99 < 0.1 ms left out):",
        kit.table("interval | n | p50 ms | p99 ms", segments),
        f"Goal p50 ≤ {GOAL_P50_S * 1000:.0f} ms: "
        f"**{kit.ms(e2e)} ms, {'met' if e2e <= GOAL_P50_S else 'not met'}**; "
        f"the bare encode is {kit.ms(embed50)} ms ({e2e / embed50:.1f}×). Errors: {len(samples.errors)}{errors}.",
        onnxruntime=onnxruntime.__version__,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.arguments("miss_overhead", __doc__)
    parser.add_argument("--passes", type=int, default=5, help="measured passes over the queries")
    parser.add_argument("--queries", type=int, default=None, help="only the first N queries")
    parser.add_argument("--limit-corpus", type=int, default=None, help="only the first N passages")
    args = kit.parse(parser, argv, passes=1, queries=3, limit_corpus=200)
    if args.passes < 1:
        parser.error("--passes must be positive")
    return kit.publish_run(SECTION, run(args), args, kit.MSMARCO / "corpus.jsonl", kit.MSMARCO / "queries.jsonl")


if __name__ == "__main__":
    raise SystemExit(main())
