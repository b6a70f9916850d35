"""Load: hundreds of concurrent SSE answer streams on one `rag-serve` worker, then 1 vs 2 workers,
each with admission control off (`RAG_ADMISSION_SLOTS=0` and no Postgres timeouts, as before issue 11)
and on (the defaults).

Per round and worker count, on a fresh `rag-serve` and a flushed cache:
1. miss burst: `--streams` distinct questions (every one a real generation) started at once, each on
   its own connection: completed / shed (503 `overloaded`) / failed, client TTFT, RSS of the server's
   process tree, `GET /health` latency from a separate probe process every 100 ms (the event-loop lag
   proxy), and a victim: another key's miss sent 0.5 s into the burst, its TTFT over its idle TTFT;
2. prime: the same questions again, 16 at a time (how many the burst cached);
3. hit load: `--hit-concurrency` keep-alive clients asking them round-robin for `--hit-seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import multiprocessing
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench import _kit as kit

SECTION = "Load"
REDIS_DB = 8  # bench.workload uses 1-3, bench.stampede 4-6
QUESTION_PREFIX = "what do the sources say about"
SHED = "http:503:overloaded"  # refused by admission control
# Admission "off" = before issue 11: no admission gate, and no bound on Postgres waits (with 300
# misses at once and no gate, a bounded pool acquire would turn the wait for one of 10 connections
# into 503 database_unavailable).
BEFORE = ("RAG_ADMISSION_SLOTS", "RAG_DB_ACQUIRE_TIMEOUT_S", "RAG_DB_STATEMENT_TIMEOUT_S", "RAG_DB_COMMAND_TIMEOUT_S")


# --------------------------------------------------------------------------- the server's process tree


def process_tree_rss(root: int) -> dict[int, int]:
    """VmRSS (KiB) of `root` and every descendant (/proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if entry.name.isdigit():
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    rss, todo = {}, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        rss[pid] = 0
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            rss[pid] = int(next(x for x in status if x.startswith("VmRSS:")).split()[1])
    return rss


async def wait_for_workers(root: int, workers: int, min_kb: int = 150_000, within: float = 180) -> None:
    """Until `workers` processes of the tree hold the model (RSS ≥ `min_kb`; ~175 MB at rest) and the total stopped
    growing."""
    deadline, last = time.monotonic() + within, 0
    while time.monotonic() < deadline:
        rss = process_tree_rss(root)
        total = sum(rss.values())
        if sum(1 for v in rss.values() if v >= min_kb) >= workers and abs(total - last) < 0.01 * total:
            return
        last = total
        await asyncio.sleep(1)
    kit.say(f"warning: {workers} loaded workers not seen within {within:.0f} s")


@asynccontextmanager
async def sampled(root: int, interval: float = 0.05) -> AsyncIterator[dict[str, Any]]:
    """While open: this process's own loop lag every `interval` s, and the server tree's RSS peak every 0.5 s."""
    found: dict[str, Any] = {"peak_kb": 0, "lags": []}

    async def rss() -> None:
        while True:
            found["peak_kb"] = max(found["peak_kb"], sum((await asyncio.to_thread(process_tree_rss, root)).values()))
            await asyncio.sleep(0.5)

    async def lag() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(interval)
            found["lags"].append(time.monotonic() - before - interval)

    tasks = [asyncio.create_task(rss()), asyncio.create_task(lag())]
    try:
        yield found
    finally:
        for task in tasks:
            task.cancel()


def _probe_main(url: str, interval: float, control: Any) -> None:
    """In a process of its own: GET /health every `interval` s on one keep-alive connection until told to stop."""

    async def probe() -> list[tuple[float, float]]:
        client, samples = kit.Client(url), []
        next_at = time.monotonic()
        control.send("ready")  # importing this module in a spawned process takes seconds on a busy machine
        while not control.poll(0):
            reply = await client.request("GET", "/health", limit_s=30)
            samples.append((reply.started, reply.total_s if reply.status == 200 else math.nan))
            next_at = max(next_at + interval, time.monotonic() - interval)  # after a slow reply, no burst
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        client.close()
        return samples

    control.send(asyncio.run(probe()))


@asynccontextmanager
async def health_probe(url: str) -> AsyncIterator[list[tuple[float, float]]]:
    """`_probe_main` every 100 ms in a spawned process while open; its samples are in the list once closed."""
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    process = ctx.Process(target=_probe_main, args=(url, 0.1, theirs), daemon=True)
    process.start()
    await asyncio.to_thread(mine.recv)  # "ready"
    samples: list[tuple[float, float]] = []
    yield samples
    mine.send("stop")
    samples += await asyncio.to_thread(mine.recv)
    await asyncio.to_thread(process.join, 10)


# --------------------------------------------------------------------------- one run


async def miss_burst(url: str, token: str, server_pid: int, questions: list[str], victim: str) -> dict[str, Any]:
    async with health_probe(url) as samples:
        await asyncio.sleep(3)  # the probe's idle baseline
        rss_before = sum(process_tree_rss(server_pid).values())
        idle = await kit.ask(url, victim, {"question": questions[-2]})  # the victim key's miss on an idle server
        async with sampled(server_pid) as sampler:
            started = time.monotonic()
            burst = [asyncio.create_task(kit.ask(url, token, {"question": q})) for q in questions[:-2]]
            await asyncio.sleep(0.5)  # the burst is in the server
            noisy = await kit.ask(url, victim, {"question": questions[-1]})
            results = await asyncio.gather(*burst)
            ended = time.monotonic()
        await asyncio.sleep(2)
        rss_after = sum(process_tree_rss(server_pid).values())
    ok = [r for r in results if r.ok]
    shed = sum(r.outcome == SHED for r in results)
    return {
        "complete": len(ok),
        "shed": shed,
        "failed": len(results) - len(ok) - shed,
        "victim": [idle.outcome, noisy.outcome, noisy.ttft_s / idle.ttft_s],
        "outcomes": dict(Counter(r.outcome for r in results)),
        "failures": [f"{r.outcome}: {r.error}" for r in results if not r.ok and r.outcome != SHED][:10],
        "ttft": kit.stats([r.ttft_s for r in ok]),
        "server_ttft_ms": kit.stats([r.server_ttft_ms for r in ok]),
        "duration_s": ended - started,
        "rps": len(ok) / (ended - started),
        "rss_kb": [rss_before, max(sampler["peak_kb"], rss_before, rss_after), rss_after],
        "health_idle": kit.stats([lat for at, lat in samples if at < started - 0.2]),
        "health": kit.stats([lat for at, lat in samples if started <= at <= ended]),
        "client_lag": kit.stats(sampler["lags"]),
    }


async def hit_load(url: str, token: str, questions: list[str], concurrency: int, seconds: float) -> dict[str, Any]:
    """Closed loop: `concurrency` keep-alive clients asking cached questions round-robin (after 2 s of warm-up)."""
    clients, asked = [kit.Client(url, kit.bearer(token)) for _ in range(concurrency)], itertools.cycle(questions)

    async def send(client: kit.Client) -> kit.Reply:
        return await client.request("POST", "/rag/stream", {"question": next(asked)})

    await kit.closed_loop(clients, 2, send)
    results = await kit.closed_loop(clients, seconds, send)
    for client in clients:
        client.close()
    ok = [r for r in results if r.ok]
    return {
        "ok": len(ok),
        "rps": len(ok) / seconds,
        "outcomes": dict(Counter(r.outcome for r in results)),
        "latency": kit.stats([r.total_s for r in ok]),
    }


async def one_run(
    args: Any, stack: kit.ReplayStack, workers: int, rnd: int, admission: str, questions: list[str], out: Path
) -> dict[str, Any]:
    redis_url = await stack.fresh(REDIS_DB)
    await stack.provider.reset()
    log = out / f"rag-serve-w{workers}-r{rnd}-{admission}.log"
    env = dict.fromkeys(BEFORE, "0") if admission == "off" else {}
    if workers > 1:  # prometheus-client's multiprocess directory: one per run
        (out / f"prom-w{workers}-r{rnd}-{admission}").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(out / f"prom-w{workers}-r{rnd}-{admission}")
    async with stack.serve(redis_url, log, env, workers) as server:
        await wait_for_workers(server.pid, workers)
        await kit.warm_up(server.url, stack.token, 2 * workers)
        await stack.provider.reset()
        kit.say(f"== round {rnd}, {workers} worker(s), admission {admission}: {len(questions) - 2} concurrent streams")
        async with aioredis.from_url(redis_url) as client:
            xadds = await xadd_calls(client)
        burst = await miss_burst(server.url, stack.token, server.pid, questions, args.victim)
        calls = await stack.provider.calls()
        async with aioredis.from_url(redis_url) as client:
            cached = len([k async for k in client.scan_iter(match="ragcache:answer:*", count=1000)])
            xadds = await xadd_calls(client) - xadds
        kit.say(
            f"   complete {burst['complete']}/{len(questions) - 2} (shed {burst['shed']}), "
            f"TTFT p99 {kit.ms(burst['ttft']['p99'])} ms; {cached} cached; {xadds} XADDs (followers' streams)"
        )
        sem = asyncio.Semaphore(16)

        async def again(question: str) -> str:
            async with sem:
                return (await kit.ask(server.url, stack.token, {"question": question})).outcome

        primed = Counter(await asyncio.gather(*(again(q) for q in questions[:-2])))
        hits = await hit_load(server.url, stack.token, questions[:-2], args.hit_concurrency, args.hit_seconds)
        kit.say(f"   prime pass {dict(primed)}; hit load {hits['rps']:.0f} req/s")
    first = [c["first_token_s"] for c in calls if c["first_token_s"] is not None]
    return {
        "workers": workers,
        "round": rnd,
        "admission": admission,
        "burst": burst,
        "provider_calls": len(calls),
        "provider_first_token": kit.stats(first),
        "primed_hits": primed.get("hit", 0),
        "hits": hits,
        "warnings": kit.warnings_in(log),
        "xadds": xadds,
    }


async def xadd_calls(client: aioredis.Redis) -> int:
    """XADDs the Valkey server has run so far (INFO commandstats; the bench's server is its own)."""
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get("cmdstat_xadd", {}).get("calls", 0))


def report(runs: list[dict[str, Any]], streams: int) -> str:
    rows = []
    for r in runs:
        b, h = r["burst"], r["hits"]
        rows.append(
            f"{r['workers']} | {r['round']} | {r['admission']} | **{b['complete']}** / {b['shed']} / {b['failed']} | "
            f"{kit.ms(b['ttft']['p50'])} / {kit.ms(b['ttft']['p95'])} / **{kit.ms(b['ttft']['p99'])}** | "
            f"{b['duration_s']:.1f} s, {b['rps']:.1f}/s | "
            f"{' / '.join(f'{kb / 1024:,.0f}' for kb in b['rss_kb'])} | "
            f"{kit.ms(b['health_idle']['p50'])} → {kit.ms(b['health']['p50'])} / {kit.ms(b['health']['max'])} | "
            f"{kit.ms(b['client_lag']['p95'])} / {kit.ms(b['client_lag']['max'])} | "
            f"×{b['victim'][2]:.1f} ({b['victim'][1]}) | "
            f"{r['primed_hits']} / {streams} | "
            f"**{h['rps']:.0f}** | {kit.ms(h['latency']['p50'])} / {kit.ms(h['latency']['p99'])}"
        )
    lines = [
        kit.table(
            "workers | round | admission | complete / shed / failed | TTFT p50 / p95 / p99 ms | burst | RSS before / "
            "peak / after MB | /health idle p50 → during p50 / max ms | client lag p95 / max ms | victim TTFT / idle | "
            "cached by the burst | hits/s | hit latency p50 / p99 ms",
            rows,
        )
    ]
    workers = sorted({r["workers"] for r in runs})
    if len(workers) >= 2 and len({r["admission"] for r in runs}) == 1:

        def med(w: int, pick: Any) -> float:
            return float(statistics.median(pick(r) for r in runs if r["workers"] == w))

        lo, hi = workers[0], workers[-1]
        miss = [med(w, lambda r: r["burst"]["rps"]) for w in (lo, hi)]
        hit = [med(w, lambda r: r["hits"]["rps"]) for w in (lo, hi)]
        lines.append(
            f"**{hi} workers vs {lo}** (medians): miss burst {miss[0]:.1f} → {miss[1]:.1f} req/s "
            f"(×{miss[1] / miss[0]:.2f}), "
            f"hit load {hit[0]:.0f} → {hit[1]:.0f} req/s (×{hit[1] / hit[0]:.2f})."
        )
    failures = [f"{r['workers']}w r{r['round']} {r['admission']}: {f}" for r in runs for f in r["burst"]["failures"]]
    warns = [
        f"{r['workers']}w r{r['round']} {r['admission']}: {'; '.join(f'{k} ×{v}' for k, v in r['warnings'].items())}"
        for r in runs
        if r["warnings"]
    ]
    lines.append(
        f"Failed streams: {'; '.join(failures[:10]) or 'none'}. Server log warnings: {' | '.join(warns) or 'none'}."
    )
    return "\n\n".join(lines)


async def main_async(args: Any) -> None:
    out = kit.run_dir("load")
    load_start = kit.load_text()
    orders = [(w, a) for w in args.workers for a in args.admission]
    plan = [(rnd, *wa) for rnd in range(1, args.rounds + 1) for wa in (orders if rnd % 2 else orders[::-1])]
    per_run = args.streams + 2  # and the victim's two questions
    questions = kit.passage_questions(per_run * len(plan), prefix=QUESTION_PREFIX)
    runs: list[dict[str, Any]] = []
    async with kit.replay_stack(args) as stack:
        try:
            args.victim = await kit.create_key(stack.dsn)  # a second API key
            for i, (rnd, workers, admission) in enumerate(plan):
                mine = questions[i * per_run : (i + 1) * per_run]
                runs.append(await one_run(args, stack, workers, rnd, admission, mine, out))
        finally:  # the burst's questions went into the shared corpus database's semantic index
            await kit.fetchval(stack.dsn, "DELETE FROM semantic_cache WHERE question LIKE $1", f"{QUESTION_PREFIX} %")
        documents = stack.documents
    setup = (
        f"{kit.model_line(args, documents)} Load average at start {load_start}. Miss burst: {args.streams} distinct "
        "questions at once, each on a new connection; TTFT = request sent → first `token` event at the client; RSS "
        "= VmRSS summed over `rag-serve` and its descendants; /health probed every 100 ms from a separate process. "
        f"Hit load: {args.hit_concurrency} keep-alive clients for {args.hit_seconds:g} s."
    )
    kit.publish(SECTION, kit.section(args, setup, report(runs, args.streams)), args, {"runs": runs}, out)


def main(argv: list[str] | None = None) -> None:
    parser = kit.arguments("load", __doc__)
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--admission", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--hit-seconds", type=float, default=15)
    parser.add_argument("--hit-concurrency", type=int, default=32)
    kit.replay_arguments(parser, first_token_delay=0.5, token_interval=0.025)
    quick = {"streams": 10, "rounds": 1, "workers": [1], "hit_seconds": 1.0, "hit_concurrency": 4}
    args = kit.parse(parser, argv, **quick, limit_corpus=200, answer_tokens=20)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
