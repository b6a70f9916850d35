"""Stampede: N concurrent identical cache misses over two `rag-serve` processes cost one generation.

Per variant two `rag-serve` processes (one worker each) share Postgres and Redis. Per round (a
different msmarco query each round, caches flushed) `--requests` identical `/rag/stream` requests
start at once on new connections, alternating between the two processes. Reported: generation calls
the provider received (goal 1), outcomes, followers' client TTFT relative to the leader's, and
whether every complete answer is byte-identical to the one the provider sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from typing import Any

from bench import _kit as kit

SECTION = "Stampede"


# variant -> (the servers' extra environment, their logical Redis db)
VARIANTS: dict[str, tuple[dict[str, str], int]] = {
    "default": ({}, 4),
    "no-semantic": ({"RAG_SEMANTIC_CACHE": "false"}, 5),
    "one-thread": ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, 6),
}


async def run_round(question: str, urls: list[str], n: int, stack: kit.ReplayStack) -> dict[str, Any]:
    await stack.provider.reset()
    targets = [i % len(urls) for i in range(n)]
    replies = await asyncio.gather(*(kit.ask(urls[t], stack.token, {"question": question}) for t in targets))
    calls = await stack.provider.calls()
    leaders = [r for r in replies if r.outcome == "miss"]
    leader = leaders[0] if len(leaders) == 1 else None
    followers = [r for r in replies if r.outcome in ("coalesced", "hit")]
    texts = {r.text for r in replies if r.ok}
    follower_ttft = [r.ttft_s * 1000 for r in followers]
    leader_ttft = leader.ttft_s * 1000 if leader else math.nan
    p50, p95 = kit.percentile(follower_ttft, 50), kit.percentile(follower_ttft, 95)
    return {
        "provider_calls": len(calls),
        "outcomes": dict(Counter(r.outcome for r in replies)),
        "by_server": [
            dict(Counter(r.outcome for r, t in zip(replies, targets, strict=True) if t == s)) for s in (0, 1)
        ],
        "all_done": all(r.ok for r in replies),
        "errors": [f"{r.outcome}: {r.error}" for r in replies if not r.ok][:5],
        "identical": texts == {calls[0]["text"] if calls else None},
        "distinct_answers": len(texts),
        "followers": len(followers),
        "leader_ttft": leader_ttft,
        "leader_server_ttft": leader.server_ttft_ms if leader else math.nan,
        "follower_ttft_p50": p50,
        "follower_ttft_p95": p95,
        "follower_server_ttft_p95": kit.percentile([r.server_ttft_ms for r in followers], 95),
        "ratio_p50": p50 / leader_ttft if leader_ttft else math.nan,
        "ratio_p95": p95 / leader_ttft if leader_ttft else math.nan,
    }


def report(rounds: list[dict[str, Any]], variants: list[str]) -> str:
    def split(d: dict[str, int]) -> str:
        return "/".join(str(d.get(k, 0)) for k in ("miss", "coalesced", "hit"))

    rows = [
        (
            f"{r['variant']} | {r['round']} | **{r['provider_calls']}** | "
            f"{split(r['outcomes'])} / "
            f"{sum(v for k, v in r['outcomes'].items() if k not in ('miss', 'coalesced', 'hit'))} | "
            f"{split(r['by_server'][0])}; {split(r['by_server'][1])} | {kit.fmt_ms(r['leader_ttft'])} | "
            f"{kit.fmt_ms(r['follower_ttft_p50'])} / {kit.fmt_ms(r['follower_ttft_p95'])} | "
            f"{r['ratio_p50']:.2f} / {r['ratio_p95']:.2f} | "
            f"{'yes' if r['identical'] else 'NO'} ({r['distinct_answers']} distinct)"
        )
        for r in rounds
    ]
    summary = []
    for v in variants:
        mine = [r for r in rounds if r["variant"] == v]
        good = sum(1 for r in mine if r["provider_calls"] == 1 and r["identical"] and r["all_done"])

        def med(key: str, rs: list[dict[str, Any]] = mine) -> float:
            return kit.percentile([r[key] for r in rs], 50)  # NaN left out

        coalesced = sum(r["outcomes"].get("coalesced", 0) for r in mine) / max(sum(r["followers"] for r in mine), 1)
        summary.append(
            f"{v} | {good} / {len(mine)} | {sum(r['provider_calls'] for r in mine)} | {coalesced:.0%} | "
            f"**{med('ratio_p50'):.2f} / {med('ratio_p95'):.2f}** | "
            f"{kit.fmt_ms(med('leader_server_ttft'))} / {kit.fmt_ms(med('follower_server_ttft_p95'))}"
        )
    errors = [f"{r['variant']} round {r['round']}: {e}" for r in rounds for e in r["errors"]]
    return "\n\n".join(
        [
            kit.table(
                "variant | round | provider calls | miss / coalesced / hit / other | per process A; B | "
                "leader TTFT ms | followers TTFT p50 / p95 ms | ratio p50 / p95 | identical answers",
                rows,
            ),
            kit.table(
                "variant | rounds with 1 call, identical, complete | provider calls | followers coalesced | "
                "follower/leader TTFT p50 / p95 (median) | server TTFT leader / followers p95 ms",
                summary,
            ),
            f"Errors: {'; '.join(errors) if errors else 'none'}.",
        ]
    )


async def main_async(args: Any) -> None:
    queries = kit.load_queries()
    out = kit.run_dir("stampede")
    rounds = []
    async with kit.replay_stack(args) as stack, contextlib.AsyncExitStack() as servers:
        urls: dict[str, list[str]] = {}
        for name in args.variants:
            env, redis_db = VARIANTS[name]
            redis_url = await stack.fresh(redis_db)
            for x in "ab":
                server = await servers.enter_async_context(
                    stack.serve(redis_url, out / f"rag-serve-{name}-{x}.log", env)
                )
                await kit.warm_up(server.url, stack.token)
                urls.setdefault(name, []).append(server.url)
        for i in range(args.rounds):
            question = queries[i % len(queries)].text
            for name in args.variants:
                await stack.fresh(VARIANTS[name][1])
                await asyncio.sleep(1)  # let the previous round's sockets and streams settle
                kit.say(f"== round {i + 1}, {name}: {args.requests} × “{question}”")
                result = await run_round(question, urls[name], args.requests, stack)
                rounds.append(result | {"variant": name, "round": i + 1})
                kit.say(f"   {result['provider_calls']} provider calls, {result['outcomes']}, {result['identical']=}")
        documents = stack.documents
    setup = (
        f"{kit.model_line(args, documents)} Per round and variant: caches flushed, {args.requests} identical requests "
        "started at once (new connection each) over two `rag-serve` processes. TTFT is measured by the client; "
        "ratio = follower TTFT ÷ leader TTFT."
    )
    kit.publish(SECTION, kit.section(args, setup, report(rounds, args.variants)), args, {"rounds": rounds}, out)


def main(argv: list[str] | None = None) -> None:
    parser = kit.arguments("stampede", __doc__)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    kit.replay_arguments(parser)
    args = kit.parse(parser, argv, requests=10, rounds=1, variants=["default"], limit_corpus=200, answer_tokens=20)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
