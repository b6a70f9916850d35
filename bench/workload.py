"""A replayed question workload: cache off vs exact only vs exact + semantic, side by side in one run.

    python -m bench.workload [--requests 600] [--limit-corpus N] [--concurrency 8]
                             [--server-env KEY=VALUE ...] [--no-write]

Workload: `--requests` questions drawn Zipf-like (s = `--zipf`, fixed `--seed`) over the 50
msmarco-5k queries (popularity order = a seeded shuffle); each draw sends the original text or,
with probability `--paraphrase-share`, one of its paraphrases from `bench/paraphrases.jsonl`
(40 of the 50 queries have two). The same sequence is replayed against each configuration with
`--concurrency` clients, each configuration on fresh caches (its own flushed Redis database and
an emptied semantic index):

- off:      every request sends `"cache": "bypass"` (no read, no write, no coalescing);
- exact:    `RAG_SEMANTIC_CACHE=false`;
- semantic: the defaults (exact, then semantic look-up).

The model is the loopback `ProviderServer` speaking the Anthropic API (the real SDK talks to it)
with a fixed first-token delay and token interval; every configuration is a fresh `rag-serve`
process (one worker) over the same embedded Postgres (msmarco-5k ingested once) and Valkey.
Every request sends one API key created without `rpm` or `tokens_per_day` (the default path: no
rate-limit call to Redis, no token budget).

Per configuration: provider calls (generation requests the provider server received), outcomes
(hit / semantic_hit / coalesced / miss / bypass), client-measured time to the first `token` event
and the server's `done.ttft_ms`, tokens and dollars saved (`done.saved` of hits and coalesced
answers) and spent (`done.usage`). Every semantic hit is checked: `meta.semantic.matched_question_hash`
is mapped back to the query it was asked for (`service.redis.answer_cache.question_hash` of every text sent); a
match with another query id is a false hit. Afterwards, offline, the same policy the service runs
(`service.policy.semantic_judge.judge` over all-MiniLM-L6-v2 cosines) is applied to every pair of texts of one
query (why paraphrases hit or miss) and to every pair of texts of different queries (false-hit
candidates the workload may not have exercised).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench._serve import (
    Query,
    ReplayStack,
    Reply,
    busy_processes,
    fmt_ms,
    fresh_caches,
    load_queries,
    now_stamp,
    rag_serve,
    replay_arguments,
    replay_stack,
    stream,
    warm_up,
)
from bench.common import RESULTS, load_average, machine_line, markdown_table, percentile, publish, say

SECTION = "Cached workload"


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    cache: str  # the request's "cache" field
    env: dict[str, str]
    redis_db: int


CONFIGS = [
    Config("off", "cache off (bypass)", "bypass", {}, 1),
    Config("exact", "exact only", "use", {"RAG_SEMANTIC_CACHE": "false"}, 2),
    Config("semantic", "exact + semantic", "use", {}, 3),
]


@dataclass(frozen=True)
class Draw:
    index: int
    query_id: str
    text: str
    paraphrase: bool


def draw_workload(queries: list[Query], n: int, s: float, share: float, seed: int) -> list[Draw]:
    rng = random.Random(seed)
    ranked = list(queries)
    rng.shuffle(ranked)  # popularity rank; not the file's order
    weights = [1.0 / (rank + 1) ** s for rank in range(len(ranked))]
    draws = []
    for i in range(n):
        query = rng.choices(ranked, weights)[0]
        if query.paraphrases and rng.random() < share:
            draws.append(Draw(i, query.query_id, rng.choice(query.paraphrases), True))
        else:
            draws.append(Draw(i, query.query_id, query.text, False))
    return draws


def opportunities(draws: list[Draw]) -> dict[str, int]:
    """What a cache could serve at best, ignoring concurrency: repeats of a text, and new wordings of a query."""
    seen_text: set[str] = set()
    seen_query: set[str] = set()
    repeat = new_wording = first = 0
    for d in draws:
        if d.text in seen_text:
            repeat += 1
        elif d.query_id in seen_query:
            new_wording += 1
        else:
            first += 1
        seen_text.add(d.text)
        seen_query.add(d.query_id)
    return {"repeat_text": repeat, "new_wording": new_wording, "first_of_query": first}


@dataclass
class ConfigResult:
    config: str
    replies: list[Reply]
    provider_calls: int
    wall_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    busy: list[str]


async def run_config(
    config: Config,
    draws: list[Draw],
    *,
    stack: ReplayStack,
    concurrency: int,
    extra_env: dict[str, str],
    run_dir: Path,
) -> ConfigResult:
    provider = stack.provider
    redis_url = stack.servers.redis_url(config.redis_db)
    await fresh_caches(stack.dsn, redis_url)
    async with (
        rag_serve(
            dsn=stack.dsn,
            redis_url=redis_url,
            provider_url=provider.base_url,
            log=run_dir / f"rag-serve-{config.name}.log",
            env={**config.env, **extra_env},
        ) as server,
        stack.client(limits=httpx.Limits(max_connections=concurrency * 2)) as http,
    ):
        await warm_up(http, server.url)
        await provider.reset()
        load_before = load_average()
        replies: list[Reply | None] = [None] * len(draws)
        cursor = itertools.count()

        async def client() -> None:
            while (i := next(cursor)) < len(draws):
                replies[i] = await stream(http, server.url, {"question": draws[i].text, "cache": config.cache})

        started = time.perf_counter()
        busy = busy_processes()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        calls = len(await provider.calls())
    done = [r for r in replies if r is not None]
    return ConfigResult(config.name, done, calls, wall, load_before, load_average(), busy)


# --------------------------------------------------------------------------- analysis


def summarize(result: ConfigResult, draws: list[Draw], hash_to_query: dict[str, str]) -> dict[str, Any]:
    replies = result.replies
    n = len(replies)
    outcomes = Counter(r.outcome for r in replies)
    ok = [r for r in replies if r.ok]

    def pct(values: list[float], p: float) -> float:
        return percentile([v for v in values if not math.isnan(v)], p)

    semantic = []
    false_hits = []
    asked: set[str] = set()
    for draw, reply in zip(draws, replies, strict=True):
        first_time = draw.text not in asked
        asked.add(draw.text)
        if reply.outcome == "semantic_hit":
            matched = hash_to_query.get(str(reply.semantic.get("matched_question_hash")), "?")
            row = {
                "index": draw.index,
                "first_time": first_time,  # the first request with this exact wording
                "sent": draw.text,
                "query_id": draw.query_id,
                "matched_query_id": matched,
                "similarity": reply.semantic.get("similarity"),
                "matched_hash": reply.semantic.get("matched_question_hash"),
            }
            semantic.append(row)
            if matched != draw.query_id:
                false_hits.append(row)
    by_outcome = {}
    for outcome in sorted(outcomes):
        group = [r for r in ok if r.outcome == outcome]
        by_outcome[outcome] = {
            "n": len(group),
            "ttft_p50": pct([r.ttft_ms for r in group], 50),
            "ttft_p95": pct([r.ttft_ms for r in group], 95),
            "server_ttft_p50": pct([r.server_ttft_ms for r in group], 50),
            "server_ttft_p95": pct([r.server_ttft_ms for r in group], 95),
        }
    saved_tokens = sum(int(r.saved.get("input_tokens", 0)) + int(r.saved.get("output_tokens", 0)) for r in ok)
    spent_tokens = sum(int(r.usage.get("input_tokens", 0)) + int(r.usage.get("output_tokens", 0)) for r in ok)
    return {
        "config": result.config,
        "requests": n,
        "errors": n - len(ok),
        "error_samples": [r.error for r in replies if not r.ok][:5],
        "provider_calls": result.provider_calls,
        "outcomes": dict(outcomes),
        "hit_ratio_exact": outcomes["hit"] / n,
        "hit_ratio_semantic": outcomes["semantic_hit"] / n,
        "hit_ratio_coalesced": outcomes["coalesced"] / n,
        "ttft_p50": pct([r.ttft_ms for r in ok], 50),
        "ttft_p95": pct([r.ttft_ms for r in ok], 95),
        "server_ttft_p50": pct([r.server_ttft_ms for r in ok], 50),
        "server_ttft_p95": pct([r.server_ttft_ms for r in ok], 95),
        "by_outcome": by_outcome,
        "tokens_saved": saved_tokens,
        "usd_saved": sum(float(r.saved.get("cost_usd", 0.0)) for r in ok),
        "tokens_spent": spent_tokens,
        "usd_spent": sum(float(r.usage.get("cost_usd", 0.0)) for r in ok),
        "semantic_hits": semantic,
        "false_hits": false_hits,
        "wall_s": result.wall_s,
        "throughput_rps": n / result.wall_s if result.wall_s else math.nan,
        "load_before": result.load_before,
        "load_after": result.load_after,
        "busy_processes": result.busy,
    }


def pair_analysis(queries: list[Query]) -> dict[str, Any]:
    """The service's semantic policy offline, over every pair of texts (same query and across queries)."""
    from service.embeddings.encoders import LocalEmbedder
    from service.policy.guardrails import normalize_for_key
    from service.policy.semantic_judge import judge
    from service.settings import Settings

    threshold = Settings(_env_file=None).semantic_cache_threshold  # type: ignore[call-arg]
    texts = [(q.query_id, normalize_for_key(t)) for q in queries for t in (q.text, *q.paraphrases)]
    vectors = LocalEmbedder().encode([t for _, t in texts])
    same: list[dict[str, Any]] = []
    cross: list[dict[str, Any]] = []
    for (i, (qa, a)), (j, (qb, b)) in itertools.combinations(enumerate(texts), 2):
        similarity = float(vectors[i] @ vectors[j])
        decision = judge(similarity, a, b, threshold=threshold)
        row = {"a": a, "b": b, "query_a": qa, "query_b": qb, "similarity": similarity, "reason": decision.reason}
        if qa == qb:
            same.append(row)
        elif decision.hit:
            cross.append(row)
    return {
        "threshold": threshold,
        "same_query_pairs": len(same),
        "same_query_hits": sum(1 for r in same if r["reason"] == "semantic_hit"),
        "same_query_reasons": dict(Counter(r["reason"] for r in same)),
        "same_query": same,
        "cross_query_pairs": math.comb(len(texts), 2) - len(same),
        "cross_query_hits": cross,
    }


# --------------------------------------------------------------------------- report


def usd(value: float) -> str:
    return f"${value:.4f}"


def report(
    summaries: list[dict[str, Any]],
    pairs: dict[str, Any],
    draws: list[Draw],
    meta: dict[str, Any],
    queries: list[Query],
) -> str:
    labels = {c.name: c.label for c in CONFIGS}
    texts = {q.query_id: q.text for q in queries}
    opp = opportunities(draws)
    n = len(draws)
    distinct_texts = len({d.text for d in draws})
    distinct_queries = len({d.query_id for d in draws})
    lines = [
        f"Command (from the repository root): `{meta['command']}` — {meta['date']} — {meta['machine']}.",
        "",
        f"Setup: msmarco-5k ({meta['documents']:,} passages, ingested once with `rag-ingest add --format beir`) in "
        "embedded Postgres 18 + pgvector, embedded Valkey; one `rag-serve` process (1 worker) per configuration, "
        "fresh caches each (own flushed Redis db, emptied semantic index); every request sends one API key created "
        "without `rpm` or `tokens_per_day` (the default path: no rate-limit call to Redis, no token budget). "
        "Model: the loopback `ProviderServer` "
        f"(tests/provider_server.py, in a process of its own) behind the real Anthropic SDK "
        "(`ANTHROPIC_BASE_URL`), first token after "
        f"{meta['first_token_delay'] * 1000:.0f} ms, then {meta['answer_tokens']} tokens "
        f"{meta['token_interval'] * 1000:.0f} ms apart; routed to claude-haiku-4-5, priced at the "
        "default `RAG_PRICING` ($1 / $5 per million input / output tokens; the provider server reports input "
        "tokens as words of the prompt)."
        + (f" Extra server environment: `{' '.join(meta['server_env'])}`." if meta["server_env"] else ""),
        "",
        f"Workload: {n} requests, Zipf s = {meta['zipf']} over the 50 queries (seed {meta['seed']}), "
        f"{meta['paraphrase_share']:.0%} of draws for a query with paraphrases use one of its two paraphrases "
        f"(`bench/paraphrases.jsonl`, 40 queries); {meta['concurrency']} concurrent clients, the same sequence "
        f"for every configuration, configurations run one after another in the order shown. The sequence has "
        f"{distinct_queries} distinct queries and {distinct_texts} distinct texts: at best {opp['repeat_text']} "
        f"requests repeat an earlier text (exact-cacheable) and {opp['new_wording']} more are a new wording of "
        f"an earlier query (what a perfect semantic cache could add); {opp['first_of_query']} must be generated.",
        "",
    ]
    header = [
        "configuration",
        "provider calls",
        "exact hits",
        "semantic hits",
        "coalesced",
        "TTFT p50 / p95 (client)",
        "TTFT p50 / p95 (server)",
        "tokens saved",
        "$ saved",
        "$ spent",
    ]
    rows = []
    for s in summaries:
        rows.append(
            [
                labels[s["config"]],
                f"{s['provider_calls']} / {s['requests']}",
                f"{s['hit_ratio_exact']:.1%}",
                f"{s['hit_ratio_semantic']:.1%}",
                f"{s['hit_ratio_coalesced']:.1%}",
                f"{fmt_ms(s['ttft_p50'])} / {fmt_ms(s['ttft_p95'])} ms",
                f"{fmt_ms(s['server_ttft_p50'])} / {fmt_ms(s['server_ttft_p95'])} ms",
                f"{s['tokens_saved']:,}",
                usd(s["usd_saved"]),
                usd(s["usd_spent"]),
            ]
        )
    lines += [markdown_table(header, rows), ""]
    base = next((s for s in summaries if s["config"] == "off"), None)
    if base is not None:
        notes = []
        for s in summaries:
            if s is base:
                continue
            notes.append(
                f"{labels[s['config']]}: {s['provider_calls'] / max(base['provider_calls'], 1):.2f}× the provider "
                f"calls of cache off, TTFT p50 {s['ttft_p50'] / base['ttft_p50']:.3g}×, "
                f"p95 {s['ttft_p95'] / base['ttft_p95']:.3g}×"
            )
        lines += ["Ratios to cache off (same run): " + "; ".join(notes) + ".", ""]
    errors = [
        f"{labels[s['config']]}: {s['errors']} ({'; '.join(s['error_samples'])})" for s in summaries if s["errors"]
    ]
    lines += [f"Errors: {'; '.join(errors) if errors else 'none'} (every stream ended with `done`).", ""]

    lines += ["TTFT by outcome (ms, client-measured p50 / p95; server `done.ttft_ms` p50 / p95):", ""]
    rows = []
    for s in summaries:
        for outcome, g in s["by_outcome"].items():
            rows.append(
                [
                    labels[s["config"]],
                    outcome,
                    str(g["n"]),
                    f"{fmt_ms(g['ttft_p50'])} / {fmt_ms(g['ttft_p95'])}",
                    f"{fmt_ms(g['server_ttft_p50'])} / {fmt_ms(g['server_ttft_p95'])}",
                ]
            )
    lines += [markdown_table(["configuration", "outcome", "requests", "client", "server"], rows, "llrrr"), ""]

    load_rows = [
        [
            labels[s["config"]],
            f"{s['wall_s']:.0f} s",
            f"{s['throughput_rps']:.2f}",
            " / ".join(f"{x:.2f}" for x in s["load_before"]),
            " / ".join(f"{x:.2f}" for x in s["load_after"]),
            ", ".join(s["busy_processes"]) or "–",
        ]
        for s in summaries
    ]
    lines += [
        "Load (2-core machine shared with other jobs; load average 1 / 5 / 15 min before and after each "
        "configuration, and the busiest processes when it started):",
        "",
        markdown_table(
            ["configuration", "wall", "req/s", "load before", "load after", "busy at start"], load_rows, "lrrrrl"
        ),
        "",
    ]

    sem = next((s for s in summaries if s["config"] == "semantic"), None)
    if sem is not None and sem["semantic_hits"]:
        hits = sem["semantic_hits"]
        first = sum(1 for h in hits if h["first_time"])
        lines += [
            f"Semantic hits checked: {len(hits)}, false hits (matched question of another query id): "
            f"**{len(sem['false_hits'])}**."
            + (
                " False hits: "
                + "; ".join(
                    f"“{h['sent']}” ({h['query_id']}) served the answer of query {h['matched_query_id']} "
                    f"(similarity {h['similarity']})"
                    for h in sem["false_hits"]
                )
                if sem["false_hits"]
                else ""
            )
            + f" {first} of them were the first request with their wording (the sequence has "
            f"{opp['new_wording']} first requests of a new wording of an already asked query) and "
            f"{len(hits) - first} repeated a wording that had been asked before. A semantic hit stores nothing "
            "under the new wording's exact key, so every repeat of that wording misses the exact cache again and "
            "pays the embedding + vector look-up again (semantic hits: server TTFT p50 "
            f"{fmt_ms(sem['by_outcome']['semantic_hit']['server_ttft_p50'])} ms, exact hits "
            f"{fmt_ms(sem['by_outcome'].get('hit', {}).get('server_ttft_p50', math.nan))} ms); it is also why the "
            "exact-hit ratio is lower with the semantic cache on.",
            "",
        ]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(pairs["same_query_reasons"].items(), key=lambda kv: -kv[1]))
    lines += [
        f"Offline check of the same policy (`service.policy.semantic_judge.judge`, threshold {pairs['threshold']}, "
        f"all-MiniLM-L6-v2): of the {pairs['same_query_pairs']} pairs of texts that ask the same query, "
        f"{pairs['same_query_hits']} would be served ({reasons}); of the {pairs['cross_query_pairs']:,} pairs "
        f"of texts of different queries, {len(pairs['cross_query_hits'])} would be served"
        + (
            ": " + "; ".join(f"“{r['a']}” / “{r['b']}” ({r['similarity']:.3f})" for r in pairs["cross_query_hits"])
            if pairs["cross_query_hits"]
            else ""
        )
        + ".",
        "",
    ]
    same_rows = [
        [
            f"{r['a']}",
            f"{r['b']}",
            f"{r['similarity']:.3f}",
            "hit" if r["reason"] == "semantic_hit" else r["reason"],
        ]
        for r in sorted(pairs["same_query"], key=lambda r: (r["query_a"], r["a"], r["b"]))
    ]
    lines += [
        "<details><summary>Every same-query pair and the policy's decision</summary>",
        "",
        markdown_table(["text", "other text", "cosine", "decision"], same_rows, "llrl"),
        "",
        "</details>",
        "",
    ]
    if sem is not None and sem["semantic_hits"]:
        served = Counter((h["sent"], h["query_id"], h["matched_hash"], h["similarity"]) for h in sem["semantic_hits"])
        hit_rows = [
            [sent, texts.get(qid, qid), f"{sim}", str(count)] for (sent, qid, _h, sim), count in served.most_common()
        ]
        lines += [
            "<details><summary>Semantic hits in the run (sent text, its query, similarity to the matched "
            "cached question, times)</summary>",
            "",
            markdown_table(["sent", "its msmarco query", "similarity", "times"], hit_rows, "llrr"),
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace) -> None:
    from service.redis.answer_cache import question_hash

    queries = load_queries()
    draws = draw_workload(queries, args.requests, args.zipf, args.paraphrase_share, args.seed)
    hash_to_query = {question_hash(t): q.query_id for q in queries for t in (q.text, *q.paraphrases)}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = RESULTS / "workload" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    configs = [c for c in CONFIGS if c.name in args.configs]
    summaries = []
    results: list[ConfigResult] = []
    async with replay_stack(args, "bench-workload") as stack:
        say(f"corpus: {stack.documents} documents; {len(draws)} requests per configuration")
        for config in configs:
            say(f"== {config.label}")
            result = await run_config(
                config,
                draws,
                stack=stack,
                extra_env=dict(kv.split("=", 1) for kv in args.server_env),
                concurrency=args.concurrency,
                run_dir=run_dir,
            )
            summary = summarize(result, draws, hash_to_query)
            say(
                f"   {summary['provider_calls']} provider calls, outcomes {summary['outcomes']}, "
                f"TTFT p50/p95 {fmt_ms(summary['ttft_p50'])}/{fmt_ms(summary['ttft_p95'])} ms, "
                f"{summary['errors']} errors, {result.wall_s:.0f} s"
            )
            summaries.append(summary)
            results.append(result)
    say("offline pair analysis …")
    pairs = pair_analysis(queries)
    command = "python -m bench.workload" + (" " + " ".join(args.argv) if args.argv else "")
    meta = {
        "command": command,
        "date": now_stamp(),
        "machine": machine_line(),
        "documents": stack.documents,
        "requests": args.requests,
        "zipf": args.zipf,
        "seed": args.seed,
        "paraphrase_share": args.paraphrase_share,
        "concurrency": args.concurrency,
        "first_token_delay": args.first_token_delay,
        "token_interval": args.token_interval,
        "answer_tokens": args.answer_tokens,
        "server_env": args.server_env,
    }
    raw = {
        "meta": meta,
        "draws": [asdict(d) for d in draws],
        "summaries": summaries,
        "pairs": pairs,
        "replies": {
            r.config: [asdict(x) | {"text": x.text[:80], "events": len(x.events)} for x in r.replies] for r in results
        },
    }
    (run_dir / "summary.json").write_text(json.dumps(raw, indent=1, default=str))
    publish(SECTION, report(summaries, pairs, draws, meta, queries), no_write=args.no_write, run_dir=run_dir)


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.workload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--paraphrase-share", type=float, default=0.5)
    parser.add_argument("--configs", nargs="+", default=[c.name for c in CONFIGS], choices=[c.name for c in CONFIGS])
    parser.add_argument(
        "--server-env", nargs="*", default=[], metavar="KEY=VALUE", help="extra environment for every rag-serve"
    )
    replay_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        draws = [Draw(**d) for d in saved["draws"]]
        body = report(saved["summaries"], saved["pairs"], draws, saved["meta"], load_queries())
        publish(SECTION, body, no_write=args.no_write)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
