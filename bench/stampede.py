"""Stampede: N concurrent identical cache misses over two `rag-serve` processes cost one generation.

    python -m bench.stampede [--requests 100] [--rounds 3] [--variants default no-semantic one-thread]
                             [--limit-corpus N] [--no-write]

Setup: the embedded Postgres (msmarco-5k ingested once, shared with `bench.workload`) and Valkey
under `bench/results/replay/`; one API key without `rpm` or `tokens_per_day` (the default path:
no rate-limit call to Redis), sent by every request; per variant two `rag-serve` processes (one uvicorn worker each,
separate ports) sharing only Postgres and Redis, warmed up with `"cache": "bypass"` requests; the
loopback `ProviderServer` as the Anthropic API, in a process of its own, with a fixed first-token
delay and token interval.

Variants (server environment): `default` = as shipped; `no-semantic` = `RAG_SEMANTIC_CACHE=false`
(no embedding before the coalescing look-up); `one-thread` = `OMP_NUM_THREADS=1` (torch's
intra-op pool of one thread per process instead of one per core).

Per round (a different msmarco query each round; variants take turns, caches flushed before each):
`--requests` identical `/rag/stream` requests are started at once on new connections, alternating
between the two processes. Reported: the generation calls the provider received (goal 1), outcomes
(`miss` = the leader, `coalesced` = joined the in-flight answer, `hit` = reached the cache look-up
only after the answer was stored), client-measured time to the first `token` event of the followers
relative to the leader's, the server's `done.ttft_ms`, and whether every complete answer is
byte-identical to the one the provider sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from bench._serve import (
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

SECTION = "Stampede"


async def run_round(question: str, urls: list[str], n: int, stack: ReplayStack) -> dict[str, Any]:
    provider = stack.provider
    await provider.reset()
    # Every request on a new connection, as a stampede from many clients would be. (Pre-opened keep-alive
    # connections race uvicorn's 5 s keep-alive timeout when its event loop is saturated: the client then
    # gets a ReadError before any response, an artefact of the set-up rather than of the service.)
    limits = httpx.Limits(max_connections=n + 20, max_keepalive_connections=0)
    async with stack.client(limits=limits) as http:
        load_before = load_average()
        busy = busy_processes()
        targets = [i % len(urls) for i in range(n)]
        replies: list[Reply] = await asyncio.gather(
            *(stream(http, urls[t], {"question": question}, limit_s=120) for t in targets)
        )
    calls = await provider.calls()
    return analyse(question, replies, targets, calls, load_before, busy)


def analyse(
    question: str,
    replies: list[Reply],
    targets: list[int],
    calls: list[dict[str, Any]],
    load_before: tuple[float, float, float],
    busy: list[str],
) -> dict[str, Any]:
    outcomes = Counter(r.outcome for r in replies)
    by_server = [dict(Counter(r.outcome for r, t in zip(replies, targets, strict=True) if t == s)) for s in (0, 1)]
    leaders = [r for r in replies if r.outcome == "miss"]
    followers = [r for r in replies if r.outcome in ("coalesced", "hit")]
    coalesced = [r for r in replies if r.outcome == "coalesced"]
    leader = leaders[0] if len(leaders) == 1 else None
    provider_text = calls[0]["text"] if calls else None
    texts = {r.text for r in replies if r.ok}
    start = min(r.started_at for r in replies)
    follower_ttft = [r.ttft_ms for r in followers if not math.isnan(r.ttft_ms)]
    follower_server = [r.server_ttft_ms for r in followers if not math.isnan(r.server_ttft_ms)]
    result: dict[str, Any] = {
        "question": question,
        "requests": len(replies),
        "provider_calls": len(calls),
        "outcomes": dict(outcomes),
        "by_server": by_server,
        "leader_server": targets[replies.index(leader)] if leader else None,
        "all_done": all(r.ok for r in replies),
        "errors": [f"{r.outcome}: {r.error}" for r in replies if not r.ok][:5],
        "identical": texts == {provider_text},  # over the complete answers; errors are counted apart
        "distinct_answers": len(texts),
        "answer_tokens": calls[0]["tokens_sent"] if calls else 0,
        "provider_first_token_s": calls[0]["first_token_s"] if calls else None,
        "provider_duration_s": calls[0]["duration_s"] if calls else None,
        "dispatch_spread_ms": (max(r.started_at for r in replies) - start) * 1000,
        "leader_ttft": leader.ttft_ms if leader else math.nan,
        "leader_server_ttft": leader.server_ttft_ms if leader else math.nan,
        "leader_total": leader.total_ms if leader else math.nan,
        "followers": len(followers),
        "follower_ttft_p50": percentile(follower_ttft, 50),
        "follower_ttft_p95": percentile(follower_ttft, 95),
        "follower_ttft_max": max(follower_ttft, default=math.nan),
        "follower_server_ttft_p50": percentile(follower_server, 50),
        "follower_server_ttft_p95": percentile(follower_server, 95),
        "coalesced_ttft_p50": percentile([r.ttft_ms for r in coalesced], 50),
        "coalesced_ttft_p95": percentile([r.ttft_ms for r in coalesced], 95),
        "follower_total_p95": percentile([r.total_ms for r in followers], 95),
        "saved_usd": sum(float(r.saved.get("cost_usd", 0.0)) for r in replies if r.ok),
        "spent_usd": sum(float(r.usage.get("cost_usd", 0.0)) for r in replies if r.ok),
        "load_before": load_before,
        "load_after": load_average(),
        "busy_processes": busy,
        "replies": [asdict(r) | {"text": r.text[:60], "target": t} for r, t in zip(replies, targets, strict=True)],
    }
    lt = result["leader_ttft"]
    result["ratio_p50"] = result["follower_ttft_p50"] / lt if lt else math.nan
    result["ratio_p95"] = result["follower_ttft_p95"] / lt if lt else math.nan
    return result


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    env: dict[str, str]
    redis_db: int


VARIANTS = {
    "default": Variant("default", "as shipped (semantic cache on)", {}, 4),
    "no-semantic": Variant("no-semantic", "`RAG_SEMANTIC_CACHE=false`", {"RAG_SEMANTIC_CACHE": "false"}, 5),
    "one-thread": Variant(
        "one-thread", "semantic on, `OMP_NUM_THREADS=1`", {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, 6
    ),
}


def _split(d: dict[str, int]) -> str:
    return "/".join(str(d.get(k, 0)) for k in ("miss", "coalesced", "hit"))


def report(rounds: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    variants = [VARIANTS[v] for v in meta["variants"]]
    lines = [
        f"Command (from the repository root): `{meta['command']}` — {meta['date']} — {meta['machine']}.",
        "",
        f"Setup: msmarco-5k ({meta['documents']:,} passages) in embedded Postgres 18 + pgvector, embedded "
        "Valkey; per variant **two `rag-serve` processes** (one uvicorn worker each, own ports) that share only "
        "Postgres and Redis; every request sends one API key created without `rpm` or `tokens_per_day` (the "
        "default path: no rate-limit call to Redis). Model: the loopback `ProviderServer` (in a process of its "
        "own) behind the real "
        f"Anthropic SDK, first token after {meta['first_token_delay'] * 1000:.0f} ms, then "
        f"{meta['answer_tokens']} tokens {meta['token_interval'] * 1000:.0f} ms apart. Per round and variant: "
        f"caches flushed, then {meta['requests']} identical `/rag/stream` requests for one msmarco query "
        "(a different one each round) started at once by one asyncio client, each on a new connection, "
        "alternating between the two processes; variants take turns within each round. "
        "TTFT = from sending the request to the first `token` event, measured by the client (server: "
        "`done.ttft_ms`, which starts when the pipeline does); followers = every request but the leader "
        "(`coalesced`, or `hit` if it got to the cache look-up only after the answer was stored); "
        "ratio = follower TTFT ÷ leader TTFT.",
        "",
        "Variants: " + "; ".join(f"**{v.name}** = {v.label}" for v in variants) + ".",
        "",
    ]
    header = [
        "variant",
        "round",
        "provider calls",
        "miss / coalesced / hit / other",
        "per process A; B",
        "leader TTFT",
        "followers TTFT p50 / p95 / max",
        "ratio p50 / p95",
        "identical answers",
    ]
    rows = []
    for r in rounds:
        o = r["outcomes"]
        other = sum(v for k, v in o.items() if k not in ("miss", "coalesced", "hit"))
        rows.append(
            [
                r["variant"],
                str(r["round"]),
                f"**{r['provider_calls']}**",
                f"{o.get('miss', 0)} / {o.get('coalesced', 0)} / {o.get('hit', 0)} / {other}",
                f"{_split(r['by_server'][0])}; {_split(r['by_server'][1])}",
                f"{fmt_ms(r['leader_ttft'])} ms",
                f"{fmt_ms(r['follower_ttft_p50'])} / {fmt_ms(r['follower_ttft_p95'])} / "
                f"{fmt_ms(r['follower_ttft_max'])} ms",
                f"{r['ratio_p50']:.2f} / {r['ratio_p95']:.2f}",
                f"{'yes' if r['identical'] else 'NO'} ({r['distinct_answers']} distinct)",
            ]
        )
    lines += [markdown_table(header, rows), ""]
    summary = []
    for v in variants:
        mine = [r for r in rounds if r["variant"] == v.name]
        ok = sum(1 for r in mine if r["provider_calls"] == 1 and r["identical"] and r["all_done"])
        coalesced = sum(r["outcomes"].get("coalesced", 0) for r in mine)
        followers = sum(r["followers"] for r in mine)

        def med(key: str, rs: list[dict[str, Any]] = mine) -> float:
            values = [r[key] for r in rs if not math.isnan(r[key])]
            return statistics.median(values) if values else math.nan

        summary.append(
            [
                v.name,
                f"{ok} / {len(mine)}",
                f"{sum(r['provider_calls'] for r in mine)}",
                f"{coalesced / max(followers, 1):.0%}",
                f"{fmt_ms(med('leader_ttft'))} ms",
                f"{fmt_ms(med('follower_ttft_p50'))} / {fmt_ms(med('follower_ttft_p95'))} ms",
                f"**{med('ratio_p50'):.2f} / {med('ratio_p95'):.2f}**",
                f"{fmt_ms(med('leader_server_ttft'))} / {fmt_ms(med('follower_server_ttft_p95'))} ms",
            ]
        )
    lines += [
        "Per variant (medians over its rounds):",
        "",
        markdown_table(
            [
                "variant",
                "rounds with 1 call, identical, complete",
                "provider calls (all rounds)",
                "followers that coalesced",
                "leader TTFT",
                "followers TTFT p50 / p95",
                "ratio p50 / p95",
                "server TTFT leader / followers p95",
            ],
            summary,
        ),
        "",
    ]
    detail = [
        [
            r["variant"],
            str(r["round"]),
            f"{fmt_ms(r['leader_server_ttft'])} ms",
            f"{fmt_ms(r['follower_server_ttft_p50'])} / {fmt_ms(r['follower_server_ttft_p95'])} ms",
            f"{fmt_ms(r['leader_total'])} / {fmt_ms(r['follower_total_p95'])} ms",
            f"{r['dispatch_spread_ms']:.0f} ms",
            " / ".join(f"{x:.2f}" for x in r["load_before"]),
            ", ".join(r["busy_processes"]) or "–",
        ]
        for r in rounds
    ]
    lines += [
        "<details><summary>Server-side TTFT, stream ends, client dispatch spread and machine load per round</summary>",
        "",
        markdown_table(
            [
                "variant",
                "round",
                "leader server TTFT",
                "followers server TTFT p50 / p95",
                "stream end: leader / followers p95",
                "dispatch spread",
                "load before (1/5/15)",
                "busy at start",
            ],
            detail,
            "lrrrrrrl",
        ),
        "",
        "</details>",
        "",
    ]
    errors = [f"{r['variant']} round {r['round']}: {e}" for r in rounds for e in r["errors"]]
    lines += [f"Errors: {'; '.join(errors) if errors else 'none'}.", ""]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    queries = load_queries()
    run_dir = RESULTS / "stampede" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    variants = [VARIANTS[v] for v in args.variants]
    rounds = []
    async with replay_stack(args, "bench-stampede") as stack, contextlib.AsyncExitStack() as servers:
        urls: dict[str, list[str]] = {}
        for v in variants:
            redis_url = stack.servers.redis_url(v.redis_db)
            await fresh_caches(stack.dsn, redis_url)
            common: dict[str, Any] = {
                "dsn": stack.dsn,
                "redis_url": redis_url,
                "provider_url": stack.provider.base_url,
                "env": v.env,
            }
            pair = [
                await servers.enter_async_context(rag_serve(log=run_dir / f"rag-serve-{v.name}-{x}.log", **common))
                for x in "ab"
            ]
            urls[v.name] = [p.url for p in pair]
            async with stack.client() as http:
                for url in urls[v.name]:
                    await warm_up(http, url)
        for i in range(args.rounds):
            question = queries[i % len(queries)].text
            for v in variants:
                await fresh_caches(stack.dsn, stack.servers.redis_url(v.redis_db))
                await asyncio.sleep(1)  # let the previous round's sockets and streams settle
                say(f"== round {i + 1}, {v.name}: {args.requests} × “{question}”")
                result = await run_round(question, urls[v.name], args.requests, stack)
                result |= {"variant": v.name, "round": i + 1}
                say(
                    f"   {result['provider_calls']} provider calls, outcomes {result['outcomes']}, leader TTFT "
                    f"{fmt_ms(result['leader_ttft'])} ms, followers p50/p95 {fmt_ms(result['follower_ttft_p50'])}/"
                    f"{fmt_ms(result['follower_ttft_p95'])} ms, identical {result['identical']}"
                )
                rounds.append(result)
    command = "python -m bench.stampede" + (" " + " ".join(args.argv) if args.argv else "")
    meta = {
        "command": command,
        "date": now_stamp(),
        "machine": machine_line(),
        "documents": stack.documents,
        "requests": args.requests,
        "variants": [v.name for v in variants],
        "first_token_delay": args.first_token_delay,
        "token_interval": args.token_interval,
        "answer_tokens": args.answer_tokens,
    }
    (run_dir / "summary.json").write_text(json.dumps({"meta": meta, "rounds": rounds}, indent=1, default=str))
    publish(SECTION, report(rounds, meta), no_write=args.no_write, run_dir=run_dir)


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.stampede", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="server configurations"
    )
    replay_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        publish(SECTION, report(saved["rounds"], saved["meta"]), no_write=args.no_write)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
