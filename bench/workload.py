"""A replayed question workload: cache off vs exact only vs exact + semantic, side by side in one run.

`--requests` questions drawn Zipf-like over the 50 msmarco-5k queries; a share of draws sends one of
the query's paraphrases (`bench/paraphrases.jsonl`). The same sequence is replayed against each
configuration on fresh caches: off (`"cache": "bypass"`), exact (`RAG_SEMANTIC_CACHE=false`), the
semantic judge at the previous default (0.80) and at today's, and today's with verification on
(`RAG_SEMANTIC_VERIFY=small`) answered by the model stand-in as an oracle that knows which texts ask the
same query: an upper bound for a real small model. Every semantic hit is checked against the query it
was asked for (a match with another query is a false hit); afterwards the service's semantic policy is
applied offline to every pair of texts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from bench import _kit as kit

SECTION = "Cached workload"
HASH_SECRET = "ragcache-bench-workload-hash-secret"


@dataclass(frozen=True)
class Config:
    name: str
    cache: str  # the request's "cache" field
    env: dict[str, str]


CONFIGS = [
    Config("off", "bypass", {}),
    Config("exact", "use", {"RAG_SEMANTIC_CACHE": "false"}),
    Config("judge-0.80-previous", "use", {"RAG_SEMANTIC_CACHE_THRESHOLD": "0.80"}),
    Config("judge-default", "use", {}),
    Config("judge-default+oracle-verifier", "use", {"RAG_SEMANTIC_VERIFY": "small"}),
]


@dataclass(frozen=True)
class Draw:
    query_id: str
    text: str


def draw_workload(queries: list[kit.Query], n: int, s: float, share: float, seed: int) -> list[Draw]:
    rng = random.Random(seed)
    ranked = list(queries)
    rng.shuffle(ranked)  # popularity rank; not the file's order
    weights = [1.0 / (rank + 1) ** s for rank in range(len(ranked))]
    draws = []
    for _ in range(n):
        query = rng.choices(ranked, weights)[0]
        paraphrase = query.paraphrases and rng.random() < share
        draws.append(Draw(query.query_id, rng.choice(query.paraphrases) if paraphrase else query.text))
    return draws


def opportunities(draws: list[Draw]) -> dict[str, int]:
    """At best (ignoring concurrency): repeats of a text, and new wordings of an earlier query."""
    seen_text: set[str] = set()
    seen_query: set[str] = set()
    counts: Counter[str] = Counter()
    for d in draws:
        kind = "repeat_text" if d.text in seen_text else "new_wording" if d.query_id in seen_query else "first"
        counts[kind] += 1
        seen_text.add(d.text)
        seen_query.add(d.query_id)
    return dict(counts)


async def run_config(
    config: Config, redis_db: int, draws: list[Draw], stack: kit.ReplayStack, args: Any, hash_to_query: dict[str, str]
) -> dict[str, Any]:
    """Replay `draws` against a fresh `rag-serve` in `config`, on fresh caches; the figures of the report."""
    # A known secret, so that the bench can map matched-question hashes back to the queries it sent.
    env = {"RAG_HASH_SECRET": HASH_SECRET, **config.env}
    log = args.out / f"rag-serve-{config.name}.log"
    async with stack.serve(await stack.fresh(redis_db), log, env) as server:
        await kit.warm_up(server.url, stack.token)
        await stack.provider.reset()
        gate = asyncio.Semaphore(args.concurrency)  # first come, first served: the draws' order

        async def send(draw: Draw) -> kit.Reply:
            async with gate:
                return await kit.ask(server.url, stack.token, {"question": draw.text, "cache": config.cache})

        replies = await asyncio.gather(*(send(d) for d in draws))
        calls = await stack.provider.calls()
    verify = sum(bool(c.get("verify")) for c in calls)
    n = len(replies)
    outcomes = Counter(r.outcome for r in replies)
    ok = [r for r in replies if r.ok]
    semantic, asked = [], set()
    for draw, reply in zip(draws, replies, strict=True):
        if reply.outcome == "semantic_hit":
            info = reply.data("meta").get("semantic") or {}
            matched = hash_to_query.get(str(info.get("matched_question_hash")), "?")
            hit: dict[str, Any] = {"sent": draw.text, "query_id": draw.query_id, "matched_query_id": matched}
            hit["verified"] = "verified" in info
            semantic.append(hit | {"similarity": info.get("similarity"), "first_time": draw.text not in asked})
        asked.add(draw.text)

    def total(event: str, key: str, pick: Any = int) -> Any:
        return sum(pick((r.data("done").get(event) or {}).get(key, 0)) for r in ok)

    return {
        "config": config.name,
        "provider_calls": len(calls) - verify,
        "verify_calls": verify,
        "requests": n,
        "errors": n - len(ok),
        "error_samples": [r.error for r in replies if not r.ok][:5],
        "outcomes": dict(outcomes),
        **{f"ratio_{k}": outcomes[k] / n for k in ("hit", "semantic_hit", "coalesced")},
        "ttft": kit.stats([r.ttft_s * 1000 for r in ok]),
        "server_ttft": {o: kit.percentile([r.server_ttft_ms for r in ok if r.outcome == o], 50) for o in outcomes},
        "tokens_saved": total("saved", "input_tokens") + total("saved", "output_tokens"),
        "usd_saved": total("saved", "cost_usd", float),
        "usd_spent": total("usage", "cost_usd", float),
        "semantic_hits": semantic,
        "false_hits": [h for h in semantic if h["matched_query_id"] != h["query_id"]],
    }


def pair_analysis(queries: list[kit.Query]) -> dict[str, Any]:
    """The service's semantic policy offline, over every pair of texts (same query and across queries)."""
    from service.embeddings.encoders import LocalEmbedder
    from service.policy.guardrails import normalize_for_key
    from service.policy.semantic_judge import judge
    from service.settings import Settings

    threshold = Settings(_env_file=None).semantic_cache_threshold  # type: ignore[call-arg]
    texts = [(q.query_id, normalize_for_key(t)) for q in queries for t in (q.text, *q.paraphrases)]
    vectors = LocalEmbedder().encode([t for _, t in texts])
    same: Counter[str] = Counter()
    cross: list[str] = []
    for (i, (qa, a)), (j, (qb, b)) in itertools.combinations(enumerate(texts), 2):
        similarity = float(vectors[i] @ vectors[j])
        decision = judge(similarity, a, b, threshold=threshold)
        if qa == qb:
            same[decision.reason] += 1
        elif decision.hit:
            cross.append(f"“{a}” / “{b}” ({similarity:.3f})")
    cross_pairs = math.comb(len(texts), 2) - same.total()
    return {"threshold": threshold, "same_query": dict(same), "cross_pairs": cross_pairs, "cross_hits": cross}


def report(summaries: list[dict[str, Any]], pairs: dict[str, Any], draws: list[Draw]) -> str:
    opp = opportunities(draws)
    rows = [
        (
            f"{s['config']} | {s['provider_calls']} / {s['requests']} | {s['verify_calls']} | {s['ratio_hit']:.1%} | "
            f"{s['ratio_semantic_hit']:.1%} | {s['ratio_coalesced']:.1%} | "
            f"{kit.fmt_ms(s['ttft']['p50'])} / {kit.fmt_ms(s['ttft']['p95'])} | "
            f"{', '.join(f'{o} {kit.fmt_ms(v)}' for o, v in sorted(s['server_ttft'].items()))} | "
            f"{s['tokens_saved']:,} | ${s['usd_saved']:.4f} | ${s['usd_spent']:.4f} | "
            f"{s['errors']} {'; '.join(s['error_samples'])}"
        )
        for s in summaries
    ]
    lines = [
        f"{len(draws)} requests, {len({d.text for d in draws})} distinct texts: at best {opp.get('repeat_text', 0)} "
        f"repeat an earlier text and {opp.get('new_wording', 0)} more are a new wording of an earlier query.",
        kit.table(
            "configuration | answer calls | verification calls | exact hits | semantic hits | coalesced | client TTFT "
            "p50 / p95 ms | server TTFT p50 by outcome ms | tokens saved | $ saved | $ spent | errors",
            rows,
        ),
    ]
    for sem in (s for s in summaries if s["semantic_hits"]):
        false = "; ".join(f"“{h['sent']}” served query {h['matched_query_id']}" for h in sem["false_hits"])
        first = sum(1 for h in sem["semantic_hits"] if h["first_time"])
        verified = sum(1 for h in sem["semantic_hits"] if h["verified"])
        lines.append(
            f"{sem['config']}: semantic hits checked: {len(sem['semantic_hits'])} ({first} on a wording's first "
            f"request, {verified} verified), false hits: **{len(sem['false_hits'])}**{': ' + false if false else ''}."
        )
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(pairs["same_query"].items(), key=lambda kv: -kv[1]))
    cross = "; ".join(pairs["cross_hits"])
    lines.append(
        f"Offline, the same policy (threshold {pairs['threshold']}) over the {sum(pairs['same_query'].values())} "
        f"same-query pairs: {reasons}; over the {pairs['cross_pairs']:,} cross-query pairs it would serve "
        f"{len(pairs['cross_hits'])}{': ' + cross if cross else ''}."
    )
    return "\n\n".join(lines)


async def main_async(args: Any) -> None:
    from service.policy.guardrails import normalize_for_key
    from service.redis.answer_cache import question_hash

    queries = kit.load_queries()
    draws = draw_workload(queries, args.requests, args.zipf, args.paraphrase_share, args.seed)
    key = HASH_SECRET.encode()
    hash_to_query = {question_hash(t, key): q.query_id for q in queries for t in (q.text, *q.paraphrases)}
    args.out = kit.run_dir("workload")
    args.oracle = args.out / "oracle.json"  # the verifier stand-in's ground truth: which texts ask the same query
    groups = {normalize_for_key(t): q.query_id for q in queries for t in (q.text, *q.paraphrases)}
    args.oracle.write_text(json.dumps(groups))
    summaries = []
    async with kit.replay_stack(args) as stack:
        for redis_db, config in enumerate(CONFIGS, 1):
            kit.say(f"== {config.name}: {len(draws)} requests")
            summary = await run_config(config, redis_db, draws, stack, args, hash_to_query)
            kit.say(f"   {summary['provider_calls']} provider calls, {summary['outcomes']}, {summary['errors']} errors")
            summaries.append(summary)
        documents = stack.documents
    pairs = pair_analysis(queries)
    setup = (
        f"{kit.model_line(args, documents)} Zipf s = {args.zipf} over the 50 queries (seed {args.seed}), "
        f"{args.paraphrase_share:.0%} paraphrase share, {args.concurrency} concurrent clients; one fresh "
        "`rag-serve` and fresh caches per configuration; TTFT measured by the client."
    )
    body = kit.section(args, setup, report(summaries, pairs, draws))
    kit.publish(
        SECTION, body, args, {"draws": [asdict(d) for d in draws], "summaries": summaries, "pairs": pairs}, args.out
    )


def main(argv: list[str] | None = None) -> None:
    parser = kit.arguments("workload", __doc__)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--paraphrase-share", type=float, default=0.5)
    kit.replay_arguments(parser)
    args = kit.parse(parser, argv, requests=24, limit_corpus=200, answer_tokens=20, first_token_delay=0.1)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
