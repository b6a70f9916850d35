"""Fault timeline: a steady mixed load while Redis, then Postgres, go down and come back.

One `rag-serve` (never restarted) over an embedded Postgres and Valkey of this benchmark's own, so it
can stop and start them. Open-loop load at `--rate` requests/s: a share `--hit-share` asks one of 40
questions cached before the run, the rest a question never asked. Phases of `--phase` seconds:
normal → Valkey stopped → Valkey back → Postgres stopped (immediate) → Postgres back. Per second:
requests, errors, TTFT, outcomes and `/ready`; a plot goes to docs/fault_timeline.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench import _kit as kit
from service.embedded import start_postgres, start_valkey

SECTION = "Fault timeline"
DATA = kit.RESULTS / "fault"
PLOT = kit.ROOT / "docs" / "fault_timeline.png"
HIT_POOL = 40
PHASES = ("normal", "redis down", "redis back", "postgres down", "postgres back")


@dataclass
class Sent:
    second: int
    kind: str  # "cached" (asked before the run) | "fresh" (never asked)
    reply: kit.Reply


class OwnServers:
    """This benchmark's own embedded Postgres and Valkey, with stop/start for the faults."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.pg = start_postgres(data_dir)
        self.start_redis()

    def start_redis(self) -> None:
        """A Valkey this process owns (one left running by an interrupted run is shut down first)."""
        self.valkey = start_valkey(self.data_dir)
        if not self.valkey.owned:
            with contextlib.suppress(redis.RedisError):
                redis.Redis(unix_socket_path=str(self.valkey.socket)).shutdown(nosave=False)
            time.sleep(0.5)
            self.valkey = start_valkey(self.data_dir)
        assert self.valkey.owned, "could not start a Valkey of our own"

    def close(self) -> None:
        self.valkey.stop()
        with contextlib.suppress(Exception):
            self.pg.restart()  # a run interrupted while it was down
        self.pg.stop()


async def timeline(
    url: str, token: str, own: OwnServers, args: Any, cached: list[str], fresh: list[str]
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    t0 = time.monotonic() + 0.5
    total = args.phase * len(PHASES)
    sent: list[Sent] = []
    ready: list[tuple[float, str]] = []
    events: dict[str, tuple[float, float]] = {}  # fault → (command began, command ended), seconds from t0
    fresh_iter = iter(fresh)

    async def one(second: int, kind: str, question: str) -> None:
        sent.append(Sent(second, kind, await kit.ask(url, token, {"question": question}, limit_s=30)))

    async def poll_ready() -> None:
        while (at := time.monotonic() - t0) < total:
            ready.append((at, _status(await kit.fetch(url, "GET", "/ready", limit_s=3))))
            await asyncio.sleep(max(0.0, 1 - (time.monotonic() - t0 - at)))

    async def fault(at: float, name: str, action: Callable[[], None]) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        began = time.monotonic() - t0
        await asyncio.to_thread(action)
        events[name] = (began, time.monotonic() - t0)
        kit.say(f"   t={began:6.1f}s {name} (took {events[name][1] - began:.1f} s)")

    p = args.phase
    tasks = [
        asyncio.create_task(fault(p, "stop redis", lambda: own.valkey.stop())),
        asyncio.create_task(fault(2 * p, "start redis", own.start_redis)),
        asyncio.create_task(fault(3 * p, "stop postgres", lambda: own.pg.kill())),
        asyncio.create_task(fault(4 * p, "start postgres", lambda: own.pg.restart())),
        asyncio.create_task(poll_ready()),
    ]
    for i in range(int(total * args.rate)):
        at = i / args.rate
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        kind = "cached" if rng.random() < args.hit_share else "fresh"
        question = cached[rng.randrange(len(cached))] if kind == "cached" else next(fresh_iter)
        tasks.append(asyncio.create_task(one(int(at), kind, question)))
    await asyncio.gather(*tasks)
    return {"sent": sent, "ready": ready, "events": events, "t0": t0}


def _status(reply: kit.Reply) -> str:
    try:
        return str(json.loads(reply.body)["status"])
    except (ValueError, KeyError, TypeError):
        return reply.outcome


def classify(reply: kit.Reply) -> str:
    """hit | semantic_hit | miss | coalesced | 503 | error."""
    return reply.outcome if reply.ok else "503" if reply.status == 503 else "error"


def counts(replies: list[kit.Reply]) -> str:
    c = Counter(classify(r) for r in replies)
    order = ["hit", "semantic_hit", "coalesced", "miss", "503", "error"]
    return f"{', '.join(f'{k} {c[k]}' for k in order if c[k]) or '–'} (of {len(replies)})"


def checks(run: dict[str, Any], end: float) -> list[tuple[str, bool, str]]:
    """The expected behaviour, by send time, between the actual fault commands (down = stop ended → start began)."""
    ev, t0 = run["events"], run["t0"]
    if len(ev) < 4:
        return []

    def window(lo: float, hi: float, kind: str | None = None) -> list[kit.Reply]:
        return [x.reply for x in run["sent"] if lo <= x.reply.started - t0 < hi and kind in (None, x.kind)]

    redis_down = (ev["stop redis"][1], ev["start redis"][0])
    redis_back = (ev["start redis"][1], ev["stop postgres"][0])
    pg_down = (ev["stop postgres"][1], ev["start postgres"][0])
    pg_back = (ev["start postgres"][1], end)
    down, down_cached = window(*redis_down), window(*redis_down, "cached")
    back_hits = [r.outcome == "hit" for r in window(*redis_back, "cached")]
    pg_cached = window(*pg_down, "cached")
    pg_fresh = window(*pg_down, "fresh")
    refused = sum(1 for r in pg_fresh if r.status == 503 and r.retry_after)
    after = window(*pg_back)
    fresh_ok = sum(1 for r in window(*pg_back, "fresh") if r.ok)
    errors_after = sum(1 for r in after if not r.ok)
    misses_ok = all(r.ok for r in down_cached) and sum(r.outcome == "hit" for r in down_cached) <= 2
    served = all(r.outcome == "hit" for r in pg_cached) and bool(pg_cached)
    hits_back = (sum(back_hits) >= 0.9 * len(back_hits) > 0, f"{sum(back_hits)} of {len(back_hits)} hits")
    back_ok = (errors_after == 0 and fresh_ok > 0, f"{errors_after} errors of {len(after)}; {fresh_ok} fresh answered")
    return [
        ("Valkey down: no errors", all(r.ok for r in down), f"{sum(not r.ok for r in down)} errors of {len(down)}"),
        ("Valkey down: cached questions answered as misses", misses_ok, counts(down_cached)),
        ("Valkey back: hits again, no restart", *hits_back),
        ("Postgres down: cached questions still served", served, counts(pg_cached)),
        (
            "Postgres down: fresh questions get 503 with Retry-After",
            refused == len(pg_fresh) > 0,
            f"{refused} of {len(pg_fresh)}",
        ),
        ("Postgres back: no errors, fresh questions answered", *back_ok),
    ]


def per_second(run: dict[str, Any], seconds: int) -> list[dict[str, Any]]:
    rows = []
    for s in range(seconds):
        mine = [x.reply for x in run["sent"] if x.second == s]
        ok = [r for r in mine if r.ok]
        status = Counter(st for at, st in run["ready"] if s <= at < s + 1)
        hit, gen = ([r.ttft_s * 1000 for r in ok if (r.outcome == "hit") == h] for h in (True, False))
        rows.append(
            {
                "second": s,
                "requests": len(mine),
                "errors": len(mine) - len(ok),
                "ttft_hit_ms": kit.percentile(hit, 50),
                "ttft_gen_ms": kit.percentile(gen, 50),
                "outcomes": dict(Counter(classify(r) for r in mine)),
                "ready": status.most_common(1)[0][0] if status else "",
            }
        )
    return rows


def report(run: dict[str, Any], seconds: list[dict[str, Any]], args: Any, plotted: bool) -> str:
    events = "; ".join(f"{k} at {a:.1f} s (took {b - a:.1f} s)" for k, (a, b) in run["events"].items())
    phase_rows = []
    for i, name in enumerate(PHASES):
        mine = [x for x in run["sent"] if min(int(x.second // args.phase), len(PHASES) - 1) == i]
        cached = [x.reply for x in mine if x.kind == "cached"]
        fresh = [x.reply for x in mine if x.kind == "fresh"]
        errors = Counter(x.reply.outcome for x in mine if not x.reply.ok)
        phase_rows.append(
            f"{name} | {len(mine) / args.phase:.1f} | {sum(errors.values())} | {counts(cached)} | "
            f"{counts(fresh)} | {kit.fmt_ms(kit.percentile([r.ttft_s * 1000 for r in cached if r.ok], 50))} | "
            f"{kit.fmt_ms(kit.percentile([r.ttft_s * 1000 for r in fresh if r.ok], 50))} | "
            f"{', '.join(f'{k} ×{v}' for k, v in errors.items()) or '–'}"
        )
    sec_rows = [
        (
            f"{s['second']} | {s['requests']} | {s['errors']} | {kit.fmt_ms(s['ttft_hit_ms'])} | "
            f"{kit.fmt_ms(s['ttft_gen_ms'])} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(s['outcomes'].items()))} | {s['ready']}"
        )
        for s in seconds
    ]
    return "\n\n".join(
        [
            f"Faults: {events}. Expected behaviour, by send time:",
            "\n".join(
                f"- {'✅' if ok else '❌'} {name}: {detail}."
                for name, ok, detail in checks(run, args.phase * len(PHASES))
            ),
            kit.table(
                "phase | req/s sent | errors | cached → outcome | fresh → outcome | TTFT p50 cached ms | "
                "TTFT p50 fresh ms | errors by kind",
                phase_rows,
                "lrrllrrl",
            ),
            "![requests, errors and latency per second](fault_timeline.png)" if plotted else "(no plot)",
            "<details><summary>Per second</summary>\n\n"
            + kit.table(
                "s | sent | errors | TTFT p50 hits | TTFT p50 generated | outcomes | /ready",
                sec_rows,
                "rrrrrll",
            )
            + "\n\n</details>",
        ]
    )


def plot(seconds: list[dict[str, Any]], events: dict[str, tuple[float, float]], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        kit.say("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s["second"] for s in seconds]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    bottom = [0.0] * len(xs)
    for label, keys, color in (
        ("hit", ("hit", "semantic_hit"), "#2e7d32"),
        ("generated", ("miss", "coalesced"), "#1565c0"),
        ("503", ("503",), "#ef6c00"),
        ("error", ("error",), "#c62828"),
    ):
        ys = [float(sum(s["outcomes"].get(k, 0) for k in keys)) for s in seconds]
        ax1.bar(xs, ys, bottom=bottom, width=1.0, align="edge", color=color, label=label, linewidth=0)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax1.set_ylabel("requests / s by outcome")
    ax1.legend(loc="lower left", ncols=4, fontsize=8)
    ax2.plot(xs, [s["ttft_hit_ms"] for s in seconds], label="p50 TTFT hits", color="#2e7d32", marker=".")
    ax2.plot(xs, [s["ttft_gen_ms"] for s in seconds], label="p50 TTFT generated", color="#1565c0", marker=".")
    ax2.set_yscale("log")
    ax2.set_ylabel("ms (log)")
    ax2.set_xlabel("seconds since the load started")
    ax2.legend(fontsize=8)
    for stop, start, color in (
        ("stop redis", "start redis", "#ffcdd2"),
        ("stop postgres", "start postgres", "#bbdefb"),
    ):
        if stop in events and start in events:
            for ax in (ax1, ax2):
                ax.axvspan(events[stop][0], events[start][1], color=color, alpha=0.6, linewidth=0, zorder=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


async def main_async(args: Any) -> None:
    out = kit.run_dir("fault_timeline")
    log = out / "rag-serve.log"
    cached = kit.passage_questions(HIT_POOL, prefix="what does the corpus say about", skip=3)
    n = int(args.rate * args.phase * len(PHASES)) + 10
    fresh = kit.passage_questions(n, prefix="what do the passages tell us about", skip=5)
    own = OwnServers(DATA)
    try:
        async with kit.replay_stack(args, kit.Servers(own.pg.url, own.valkey.url, DATA)) as stack:
            async with stack.serve(await stack.fresh(0), log) as server:  # a run starts cold
                kit.say(f"warming the cache with {HIT_POOL} questions")
                for q in cached:
                    if not (await kit.ask(server.url, stack.token, {"question": q})).ok:
                        raise SystemExit(f"warming the cache failed on {q!r}")
                await asyncio.sleep(1.5)  # Valkey's append-only file is fsynced every second: it survives a restart
                kit.say(f"== {args.rate:g} req/s for {args.phase * len(PHASES):.0f} s; faults every {args.phase:g} s")
                run = await timeline(server.url, stack.token, own, args, cached, fresh)
            documents = stack.documents
    finally:
        own.close()
    seconds = per_second(run, int(args.phase * len(PHASES)))
    plotted = plot(seconds, run["events"], out / "fault_timeline.png")
    if plotted and not args.no_write:
        (out / "fault_timeline.png").replace(PLOT)
    setup = (
        f"{kit.model_line(args, documents)} One `rag-serve` worker, never restarted. Open loop, {args.rate:g} req/s, "
        f"{args.hit_share:.0%} for {HIT_POOL} cached questions, the rest fresh; an error = non-200, an SSE `error`, "
        "or no complete answer."
    )
    warnings = f"Server log warnings: {'; '.join(f'{k} ×{v}' for k, v in kit.warnings_in(log).items()) or 'none'}."
    body = kit.section(args, setup, report(run, seconds, args, plotted), warnings)
    kit.publish(SECTION, body, args, {"events": run["events"], "seconds": seconds}, out)


def main(argv: list[str] | None = None) -> None:
    parser = kit.arguments("fault_timeline", __doc__)
    parser.add_argument("--rate", type=float, default=20, help="requests per second (open loop)")
    parser.add_argument("--hit-share", type=float, default=0.7, help="share of requests for cached questions")
    parser.add_argument("--phase", type=float, default=30, help="seconds between faults")
    kit.replay_arguments(parser, first_token_delay=0.3, answer_tokens=40, limit_corpus=1000)
    parser.add_argument("--seed", type=int, default=7)
    args = kit.parse(parser, argv, rate=4.0, phase=8.0, limit_corpus=200)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
