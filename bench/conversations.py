"""Follow-up questions over the examples/ handbook: does the right document come back, and at what cost?

bench/conversations.jsonl (30 conversations, 45 follow-ups, each with the documents that answer it,
written before the rewrite rules), retrieved top 3 as asked, after the offline rules, after a
(loopback, scripted) model rewrite, and replayed through the rewrite cache. Latency is
`Rewriter.standalone` alone, in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._kit import arguments, embedded_servers, fmt_ms, parse, percentile, publish, say, section, table
from service.answer.standalone import REWRITE_SYSTEM, Rewriter
from service.embeddings.encoders import LocalEmbedder
from service.http.app import build_providers, routing_policy
from service.policy.followups import rewrite
from service.policy.history import History, Turn
from service.postgres.db import create_pool
from service.postgres.retrieval import Filters, Retriever
from service.redis.client import worker_client
from service.redis.rewrites import RewriteCache
from tests.support.answers import with_providers
from tests.support.demo import ingest_examples
from tests.support.provider_server import Behavior, ProviderServer, default_answer
from tests.support.servers import make_settings

DATA = Path(__file__).resolve().parent / "conversations.jsonl"
SECTION = "Conversations: follow-up rewriting"
TOP_K = 3


@dataclass(frozen=True)
class FollowUp:
    conversation: str
    previous: tuple[str, ...]  # earlier user turns, oldest first
    question: str
    standalone: str  # hand-written
    expect: frozenset[str]  # any of these answers it (faq.txt and the glossary repeat much of the handbook)
    primary: str  # the first listed: the handbook page about the subject


def load(path: Path = DATA) -> list[FollowUp]:
    items: list[FollowUp] = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        turns = row["turns"]
        for i, turn in enumerate(turns[1:], start=1):
            previous = tuple(t["q"] for t in turns[:i])
            items.append(
                FollowUp(
                    row["id"], previous, turn["q"], turn["standalone"], frozenset(turn["expect"]), turn["expect"][0]
                )
            )
    return items


def history(item: FollowUp) -> History:
    turns: list[Turn] = []
    for question in item.previous:
        turns += [Turn("user", question), Turn("assistant", "An answer [1].")]
    return History(tuple(turns))


class Script:
    """The loopback model: the hand-written standalone question for each rewrite prompt it is sent."""

    def __init__(self, items: Sequence[FollowUp]) -> None:
        self.by_question = {(it.previous[-3:], it.question): it.standalone for it in items}
        self.calls = 0

    def __call__(self, body: Mapping[str, Any]) -> str:
        if REWRITE_SYSTEM not in str(body.get("system")):
            return default_answer(body)
        self.calls += 1
        prompt = str(body["messages"][-1]["content"])
        turns = tuple(line[len("User: ") :] for line in prompt.splitlines() if line.startswith("User: "))
        question = prompt.split("Last question: ", 1)[1].split("\n", 1)[0]
        return self.by_question.get((turns, question), question)


async def rewrite_all(rewriter: Rewriter, items: Sequence[FollowUp]) -> tuple[list[str], list[float]]:
    """Each follow-up's standalone question, and the ms each rewrite took."""
    texts, times = [], []
    for item in items:
        started = time.perf_counter()
        texts.append((await rewriter.standalone(item.question, history(item))).text)
        times.append((time.perf_counter() - started) * 1000)
    return texts, times


async def measure(quick: bool) -> dict[str, Any]:
    items = load()
    if quick:
        items = items[:6]
    with embedded_servers(None) as servers:
        settings = make_settings(servers.admin_dsn, servers.redis_base, servers.data_dir)
        embedder = LocalEmbedder()
        say("ingesting examples/ …")
        await ingest_examples(settings, embedder)
        pool = await create_pool(servers.admin_dsn)
        retriever = Retriever(pool)
        rows = await pool.fetch("SELECT id, external_id FROM documents")
        names = {r["id"]: Path(r["external_id"]).name for r in rows}

        async def found(question: str, item: FollowUp) -> tuple[bool, bool]:
            """(the primary document in the top k, any expected document in the top k)"""
            vector = (await embedder.embed([question]))[0]
            sources = await retriever.search(vector, question, top_k=TOP_K, filters=Filters.parse(None))
            documents = {names[s.document_id] for s in sources}
            return item.primary in documents, bool(documents & item.expect)

        script = Script(items)
        results: dict[str, Any] = {"n": len(items)} | {k: {} for k in ("hits", "any", "latency_ms", "rewritten")}
        with ProviderServer() as provider:
            provider.default = Behavior(text=script)
            model_settings = with_providers(settings, provider)
            client = worker_client(servers.redis_base, max_connections=4)
            await client.flushdb()
            make = functools.partial(Rewriter, timeout_s=3, turns=3)
            offline = make(mode="offline", providers={}, policy=routing_policy(settings), cache=None)
            providers, policy = build_providers(model_settings), routing_policy(model_settings)
            model = make(mode="auto", providers=providers, policy=policy, cache=RewriteCache(client, ttl_s=3600))
            rewriters = {"offline": offline, "model": model}
            questions = {"none": [it.question for it in items], "ceiling": [it.standalone for it in items]}
            warm = History((Turn("user", "What is a warm-up?"),))
            for rewriter in rewriters.values():  # first-call costs (connections, patterns) are not the rule
                await rewriter.standalone("Is it ready?", warm)
            script.calls = 0
            for mode, rewriter in rewriters.items():
                questions[mode], results["latency_ms"][mode] = await rewrite_all(rewriter, items)
            calls_first = script.calls
            _, results["latency_ms"]["replay"] = await rewrite_all(model, items)  # every rewrite from the cache
            results["calls"] = {"model": calls_first, "replay": script.calls - calls_first}
            await client.aclose()
        # The offline rules alone, without the Rewriter around them: their own cost.
        started = time.perf_counter()
        for item in items:
            rewrite(item.question, item.previous[-3:])
        results["rules_us_each"] = (time.perf_counter() - started) * 1e6 / len(items)
        for mode, texts in questions.items():
            hits = [await found(text, item) for text, item in zip(texts, items, strict=True)]
            results["hits"][mode] = sum(primary for primary, _ in hits)
            results["any"][mode] = sum(any_ for _, any_ in hits)
            results["rewritten"][mode] = sum(t != it.question for t, it in zip(texts, items, strict=True))
        await pool.close()
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    n, lat, rows = results["n"], results["latency_ms"], []
    for mode, label in (
        ("none", "no rewrite (before)"),
        ("offline", "offline rules (RAG_REWRITE=offline)"),
        ("model", "model, small tier (loopback, hand-written replies)"),
        ("replay", "model, replayed conversation (rewrite cache)"),
    ):
        got = "model" if mode == "replay" else mode
        hits, any_hits, rewritten = results["hits"][got], results["any"][got], results["rewritten"].get(got, 0)
        p50, p99 = (fmt_ms(percentile(lat[mode], p)) if mode in lat else "0" for p in (50, 99))
        rows.append([label, f"{hits}/{n}", f"{any_hits}/{n}", rewritten, results["calls"].get(mode, 0), p50, p99])
    ceiling = [results["hits"]["ceiling"], results["any"]["ceiling"]]
    rows.append(["hand-written standalone questions (ceiling)", *(f"{c}/{n}" for c in ceiling), n, "–", "–", "–"])
    header = f"rewrite | subject's page in top {TOP_K} | any answering document in top {TOP_K} | rewritten"
    return section(
        args,
        "The 30 conversations / 45 follow-ups of bench/conversations.jsonl over the examples/ handbook "
        f"(hybrid retrieval, top {TOP_K}). The offline rules alone take {results['rules_us_each']:.0f} µs per "
        "follow-up; the model rows' latency is a loopback round trip (Notes).",
        table(f"{header} | model calls | added p50 ms | added p99 ms", rows),
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(arguments("conversations", __doc__), argv)
    results = asyncio.run(measure(args.quick))
    publish(SECTION, report(results, args), args)


if __name__ == "__main__":
    main()
