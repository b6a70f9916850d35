"""Fault timeline: a steady mixed load while Redis, then Postgres, go down and come back.

    python -m bench.fault_timeline [--rate 20] [--hit-share 0.7] [--phase 30] [--limit-corpus 1000]
                                   [--no-write] [--no-plot]

Setup: an embedded Postgres (msmarco-5k's first `--limit-corpus` passages, ingested once) and an
embedded Valkey of this benchmark's own under `bench/results/fault/` (so it can stop and start
them), one `rag-serve` process (one worker, a real API key) pointed at them, and the loopback
`ProviderServer` as the Anthropic API in a process of its own (first token after 300 ms, then 40
tokens 20 ms apart).

Load: open loop at `--rate` requests/s (sent on schedule whatever the replies do, each on a new
connection, 30 s limit): a share `--hit-share` asks one of 40 questions answered before the run
(cached: should be hits), the rest a question never asked before (a miss: retrieval + generation).

Timeline (`--phase` seconds each): normal → Valkey stopped → Valkey started again → Postgres
stopped (`pg_ctl stop -m immediate`) → Postgres started again. The server is never restarted.

Recorded per second (by the second a request was sent): requests, errors (non-200, an SSE `error`
event, or no complete answer), p50 time to the first token, outcomes, and `/ready`'s status
(polled once a second). Written: a per-phase summary and the per-second table to
docs/benchmarks.md, a plot to docs/fault_timeline.png (matplotlib, the `bench` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from bench._serve import (
    ProviderProcess,
    Servers,
    busy_processes,
    ensure_corpus,
    now_stamp,
    rag_serve,
)
from bench.common import (
    RESULTS,
    ROOT,
    create_key,
    load_average,
    load_text,
    machine_line,
    markdown_table,
    percentile,
    revision,
    say,
    update_section,
)
from bench.load import Result, Target, ask, passage_questions, warnings_in

SECTION = "Fault timeline"
DATA = RESULTS / "fault"
PLOT = ROOT / "docs" / "fault_timeline.png"
HIT_POOL = 40
HIT_PREFIX = "what does the corpus say about"
MISS_PREFIX = "what do the passages tell us about"
PHASES = ("normal", "redis down", "redis back", "postgres down", "postgres back")


@dataclass
class Sent:
    second: int
    kind: str  # "cached" (asked before the run) | "fresh" (never asked)
    result: Result


# --------------------------------------------------------------------------- servers we can stop


class OwnServers:
    """This benchmark's own embedded Postgres and Valkey, with stop/start for the faults."""

    def __init__(self, data_dir: Path) -> None:
        from service.embedded import start_postgres

        self.data_dir = data_dir
        self.pg = start_postgres(data_dir)
        self.valkey = self._own_valkey()

    def _own_valkey(self) -> Any:
        from service.embedded import start_valkey

        valkey = start_valkey(self.data_dir)
        if not valkey.owned:  # left running by an interrupted run: stop it, so this process owns the next one
            with contextlib.suppress(redis.RedisError):
                redis.Redis(unix_socket_path=str(valkey.socket)).shutdown(nosave=False)
            time.sleep(0.5)
            valkey = start_valkey(self.data_dir)
        assert valkey.owned, "could not start a Valkey of our own"
        return valkey

    @property
    def servers(self) -> Servers:
        return Servers(self.pg.url, self.valkey.url)

    def stop_redis(self) -> None:
        self.valkey.stop()

    def start_redis(self) -> None:
        self.valkey = self._own_valkey()

    def stop_postgres(self) -> None:
        self.pg.kill()

    def start_postgres(self) -> None:
        self.pg.restart()

    def close(self) -> None:
        self.valkey.stop()
        with contextlib.suppress(Exception):
            self.pg.restart()  # a run interrupted while it was down
        self.pg.stop()


# --------------------------------------------------------------------------- probes


async def ready_status(target: Target) -> str:
    """`/ready`'s status word (or the error), on a new connection, 3 s limit."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(3):
            reader, writer = await asyncio.open_connection(target.host, target.port)
            writer.write(f"GET /ready HTTP/1.1\r\nhost: {target.host}\r\nconnection: close\r\n\r\n".encode())
            raw = await reader.read()
        body = raw.partition(b"\r\n\r\n")[2]
        if b"\r\n" in body[:8]:  # chunked: one chunk
            body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
        return str(json.loads(body)["status"])
    except (OSError, TimeoutError, ValueError, KeyError) as exc:
        return f"error:{type(exc).__name__}"
    finally:
        if writer is not None:
            writer.close()


# --------------------------------------------------------------------------- the run


async def warm_cache(target: Target, questions: list[str]) -> None:
    """Ask the cached pool once (8 at a time), then check every one is a hit."""
    sem = asyncio.Semaphore(8)

    async def one(question: str) -> Result:
        async with sem:
            return await ask(target, {"question": question})

    first = await asyncio.gather(*(one(q) for q in questions))
    bad = [r for r in first if not r.ok]
    if bad:
        raise SystemExit(f"warming the cache failed: {bad[0].outcome} {bad[0].error}")
    await asyncio.sleep(1.5)  # Valkey's append-only file is fsynced every second: the pool survives a restart
    second = Counter(r.outcome for r in await asyncio.gather(*(one(q) for q in questions)))
    if second.get("hit", 0) != len(questions):
        raise SystemExit(f"the cached pool is not all hits: {dict(second)}")


async def timeline(
    target: Target, own: OwnServers, args: argparse.Namespace, cached: list[str], fresh: list[str]
) -> tuple[list[Sent], list[tuple[float, str]], list[dict[str, Any]], float]:
    rng = random.Random(args.seed)
    t0 = time.monotonic() + 0.5
    total = args.phase * len(PHASES)
    n = int(total * args.rate)
    sent: list[Sent] = []
    tasks: list[asyncio.Task[None]] = []
    fresh_iter = iter(fresh)
    ready: list[tuple[float, str]] = []
    events: list[dict[str, Any]] = []

    async def one(second: int, kind: str, question: str) -> None:
        result = await ask(target, {"question": question}, limit_s=30)
        sent.append(Sent(second, kind, result))

    async def poll_ready() -> None:
        while time.monotonic() < t0 + total:
            at = time.monotonic() - t0
            ready.append((at, await ready_status(target)))
            await asyncio.sleep(max(0.0, 1 - (time.monotonic() - t0 - at)))

    async def fault(at: float, name: str, action: Callable[[], None]) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        began = time.monotonic() - t0
        await asyncio.to_thread(action)
        ended = time.monotonic() - t0
        events.append({"event": name, "at": round(began, 2), "done": round(ended, 2)})
        say(f"   t={began:6.1f}s {name} (took {ended - began:.1f} s)")

    p = args.phase
    faults = [
        asyncio.create_task(fault(p, "stop redis", own.stop_redis)),
        asyncio.create_task(fault(2 * p, "start redis", own.start_redis)),
        asyncio.create_task(fault(3 * p, "stop postgres", own.stop_postgres)),
        asyncio.create_task(fault(4 * p, "start postgres", own.start_postgres)),
    ]
    poller = asyncio.create_task(poll_ready())
    for i in range(n):
        at = i / args.rate
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        if rng.random() < args.hit_share:
            kind, question = "cached", cached[rng.randrange(len(cached))]
        else:
            kind, question = "fresh", next(fresh_iter)
        tasks.append(asyncio.create_task(one(int(at), kind, question)))
    await asyncio.gather(*tasks, *faults, poller)
    return sent, ready, events, t0


def classify(result: Result) -> str:
    """hit | semantic_hit | miss | coalesced | 503 | error (any other failure)."""
    if result.ok:
        return result.outcome
    if result.status == 503:
        return "503"
    return "error"


def phase_of(second: float, phase: float) -> str:
    return PHASES[min(int(second // phase), len(PHASES) - 1)]


def per_second(sent: list[Sent], ready: list[tuple[float, str]], seconds: int) -> list[dict[str, Any]]:
    rows = []
    for s in range(seconds):
        mine = [x for x in sent if x.second == s]
        kinds = Counter(classify(x.result) for x in mine)
        ok = [x.result for x in mine if x.result.ok]
        status = Counter(st for at, st in ready if s <= at < s + 1)
        rows.append(
            {
                "second": s,
                "requests": len(mine),
                "errors": sum(1 for x in mine if not x.result.ok),
                "ttft_p50_ms": percentile([r.ttft_s * 1000 for r in ok], 50),
                "ttft_p50_hit_ms": percentile([r.ttft_s * 1000 for r in ok if r.outcome == "hit"], 50),
                "ttft_p50_gen_ms": percentile([r.ttft_s * 1000 for r in ok if r.outcome != "hit"], 50),
                "latency_p50_ms": percentile([x.result.total_s * 1000 for x in mine], 50),
                "outcomes": dict(kinds),
                "ready": status.most_common(1)[0][0] if status else "",
            }
        )
    return rows


def summarise(sent: list[Sent], phase: float) -> list[dict[str, Any]]:
    out = []
    for name in PHASES:
        mine = [x for x in sent if phase_of(x.second, phase) == name]
        cached = [x.result for x in mine if x.kind == "cached"]
        fresh = [x.result for x in mine if x.kind == "fresh"]
        errors = [x.result for x in mine if not x.result.ok]
        out.append(
            {
                "phase": name,
                "requests": len(mine),
                "rps": len(mine) / phase,
                "errors": len(errors),
                "error_kinds": dict(Counter(r.outcome for r in errors)),
                "retry_after_503": sum(1 for r in errors if r.status == 503 and r.retry_after),
                "cached": dict(Counter(classify(r) for r in cached)),
                "fresh": dict(Counter(classify(r) for r in fresh)),
                "n_cached": len(cached),
                "n_fresh": len(fresh),
                "ttft_cached_p50_ms": percentile([r.ttft_s * 1000 for r in cached if r.ok], 50),
                "ttft_fresh_p50_ms": percentile([r.ttft_s * 1000 for r in fresh if r.ok], 50),
                "ttft_fresh_p95_ms": percentile([r.ttft_s * 1000 for r in fresh if r.ok], 95),
                "err_latency_p50_ms": percentile([r.total_s * 1000 for r in errors], 50),
            }
        )
    return out


def transitions(sent: list[Sent], events: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """How each fault showed and how fast the service came back.

    Times are seconds from the *start* of a stop command and from the *end* of a start command (when
    the server is up again), by the time a request was sent; "in flight" = sent before a stop
    command began and finished after it.
    """
    began = {e["event"]: e["at"] for e in events}
    ready = {e["event"]: e["done"] for e in events}
    by_time = sorted(sent, key=lambda x: x.result.started)

    def rel(x: Sent) -> float:
        return x.result.started - t0

    def first(xs: list[Sent], since: float) -> float:
        return rel(xs[0]) - since if xs else math.nan

    out: dict[str, Any] = {}
    for name, kind in (("stop redis", "redis"), ("stop postgres", "postgres")):
        if name in began:
            at = began[name]
            in_flight = [x for x in by_time if rel(x) < at <= rel(x) + x.result.total_s]
            out[f"{kind}_in_flight"] = len(in_flight)
            out[f"{kind}_in_flight_failed"] = dict(Counter(x.result.outcome for x in in_flight if not x.result.ok))
    if "stop redis" in began:
        at = began["stop redis"]
        out["first_non_hit_after_redis_stop_s"] = first(
            [x for x in by_time if x.kind == "cached" and x.result.outcome != "hit" and rel(x) >= at], at
        )
    if "start redis" in ready:
        at = ready["start redis"]
        out["first_hit_after_redis_start_s"] = first(
            [x for x in by_time if x.kind == "cached" and x.result.outcome == "hit" and rel(x) >= at], at
        )
    if "stop postgres" in began:
        at = began["stop postgres"]
        out["first_503_after_postgres_stop_s"] = first(
            [x for x in by_time if x.result.status == 503 and rel(x) >= at], at
        )
    if "start postgres" in ready:
        at = ready["start postgres"]
        after = [x for x in by_time if rel(x) >= at]
        out["first_ok_miss_after_postgres_start_s"] = first([x for x in after if x.kind == "fresh" and x.result.ok], at)
        out["errors_after_postgres_start"] = dict(Counter(x.result.outcome for x in after if not x.result.ok))
        errors = [x for x in after if not x.result.ok]
        out["last_error_after_postgres_start_s"] = rel(errors[-1]) - at if errors else math.nan
    if "start postgres" in began and "start postgres" in ready:
        out["postgres_start_s"] = ready["start postgres"] - began["start postgres"]
    return out


def checks(sent: list[Sent], events: list[dict[str, Any]], t0: float, end: float) -> list[dict[str, Any]]:
    """The expected behaviour, checked over the windows between the actual fault commands."""
    began = {e["event"]: e["at"] for e in events}
    ready = {e["event"]: e["done"] for e in events}
    if len(began) < 4:
        return []

    def window(lo: float, hi: float, kind: str | None = None) -> list[Result]:
        return [x.result for x in sent if lo <= x.result.started - t0 < hi and (kind is None or x.kind == kind)]

    # Down = from the end of the stop command to the start of the start command (certainly down);
    # back = from the end of the start command on.
    redis_down = (ready["stop redis"], began["start redis"])
    redis_back = (ready["start redis"], began["stop postgres"])
    pg_down = (ready["stop postgres"], began["start postgres"])
    pg_back = (ready["start postgres"], end)
    out = []

    def add(name: str, passed: bool, detail: str) -> None:
        out.append({"check": name, "passed": passed, "detail": detail})

    down_all = window(*redis_down)
    down_cached = window(*redis_down, "cached")
    errors = [r for r in down_all if not r.ok]
    add("Valkey down: no errors", not errors, f"{len(errors)} errors of {len(down_all)} requests")
    hits = sum(1 for r in down_cached if r.outcome == "hit")
    add(
        "Valkey down: cached questions become misses (answered, not failed)",
        hits <= 2 and all(r.ok for r in down_cached),
        _counts(dict(Counter(classify(r) for r in down_cached)), len(down_cached)),
    )
    back_cached = window(*redis_back, "cached")
    hits = sum(1 for r in back_cached if r.outcome == "hit")
    add(
        "Valkey back: hits again, no restart",
        hits >= 0.9 * len(back_cached) > 0,
        f"{hits} of {len(back_cached)} cached questions were hits",
    )
    pg_cached = window(*pg_down, "cached")
    hits = sum(1 for r in pg_cached if r.outcome == "hit" and r.ok)
    add(
        "Postgres down: cached questions still served",
        hits == len(pg_cached) > 0,
        f"{hits} of {len(pg_cached)} were hits",
    )
    pg_fresh = window(*pg_down, "fresh")
    refused = sum(1 for r in pg_fresh if r.status == 503 and r.retry_after)
    add(
        "Postgres down: fresh questions get 503 with Retry-After",
        refused == len(pg_fresh) > 0,
        f"{refused} of {len(pg_fresh)} (others: "
        f"{dict(Counter(r.outcome for r in pg_fresh if not (r.status == 503 and r.retry_after))) or 'none'})",
    )
    after = window(*pg_back)
    errors = [r for r in after if not r.ok]
    fresh_ok = sum(1 for r in window(*pg_back, "fresh") if r.ok)
    add(
        "Postgres back: no errors, fresh questions answered, no restart",
        not errors and fresh_ok > 0,
        f"{len(errors)} errors of {len(after)} requests; {fresh_ok} fresh questions answered",
    )
    return out


# --------------------------------------------------------------------------- report and plot


def _f(value: float, digits: int = 0) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def _counts(counts: dict[str, int], n: int) -> str:
    order = ["hit", "semantic_hit", "coalesced", "miss", "503", "error"]
    parts = [f"{k} {counts[k]}" for k in order if counts.get(k)]
    return f"{', '.join(parts) or '–'} (of {n})"


def report(data: dict[str, Any]) -> str:
    meta, phases, seconds, trans = data["meta"], data["phases"], data["seconds"], data["transitions"]
    events = "; ".join(f"{e['event']} at {e['at']:.1f} s (took {e['done'] - e['at']:.1f} s)" for e in data["events"])
    lines = [
        f"Command (from the repository root): `{meta['command']}` — {meta['date']} — {meta['machine']}"
        + (f" — revision {meta['revision']}" if meta.get("revision") else "")
        + ". "
        f"Load average (1/5/15 min) before {meta['load_before']}, after {meta['load_after']}; busy at start: "
        f"{', '.join(meta['busy']) or '–'}.",
        "",
        f"Setup: one `rag-serve` process (one worker, real API key, never restarted) over an embedded Postgres "
        f"(msmarco-5k's first {meta['documents']:,} passages) and an embedded Valkey that belong to this benchmark "
        "alone, so it can stop and start them; model = the loopback `ProviderServer` in a process of its own, first "
        f"token after {meta['first_token_delay'] * 1000:.0f} ms, then {meta['answer_tokens']} tokens "
        f"{meta['token_interval'] * 1000:.0f} ms apart. Load: open loop, {meta['rate']:g} `/rag/stream` "
        f"requests/s sent on schedule (new connection each, 30 s limit): {meta['hit_share']:.0%} ask one of "
        f"{HIT_POOL} questions answered before the run (**cached**), the rest a question never asked before "
        "(**fresh**: retrieval + generation). An error = non-200, an SSE `error` event, or no complete answer. "
        f"Faults, {meta['phase']:g} s apart: Valkey stopped (its server process shut down), Valkey started again "
        "(append-only file: the cache comes back), Postgres stopped (`pg_ctl stop -m immediate`), Postgres "
        f"started again. Actual times: {events}.",
        "",
        "Expected behaviour, checked by the time a request was sent: down = from the end of the stop command to "
        "the start of the start command; back = after the start command returned:",
        "",
        *[f"- {'✅' if c['passed'] else '❌'} {c['check']}: {c['detail']}." for c in data.get("checks", [])],
        "",
        "Per phase (requests by the second they were sent; TTFT = client time to the first `token` event):",
        "",
    ]
    rows = [
        [
            p["phase"],
            f"{p['rps']:.1f}",
            f"{p['errors']} ({p['errors'] / max(p['requests'], 1):.1%})",
            _counts(p["cached"], p["n_cached"]),
            _counts(p["fresh"], p["n_fresh"]),
            f"{p['retry_after_503']} / {sum(v for k, v in p['error_kinds'].items() if k.startswith('http:503'))}",
            _f(p["ttft_cached_p50_ms"], 1),
            f"{_f(p['ttft_fresh_p50_ms'])} / {_f(p['ttft_fresh_p95_ms'])}",
        ]
        for p in phases
    ]
    lines += [
        markdown_table(
            [
                "phase",
                "req/s sent",
                "errors (rate)",
                "cached questions → outcome",
                "fresh questions → outcome",
                "503s with Retry-After",
                "TTFT p50 cached (ms)",
                "TTFT p50 / p95 fresh (ms)",
            ],
            rows,
            "lrrllrrr",
        ),
        "",
    ]
    error_summary = "; ".join(
        f"{p['phase']}: " + ", ".join(f"{k} ×{v}" for k, v in p["error_kinds"].items())
        for p in phases
        if p["error_kinds"]
    )
    lines += [f"Errors by kind: {error_summary or 'none'}.", ""]

    def t(key: str) -> str:
        return _f(trans.get(key, math.nan), 2)

    def kinds(key: str) -> str:
        return ", ".join(f"{k} ×{v}" for k, v in trans.get(key, {}).items()) or "none"

    lines += [
        "Transitions (request send times, from the start of a stop command and from the end of a start "
        f"command): Valkey stop — {trans.get('redis_in_flight', 0)} requests in flight, failed: "
        f"{kinds('redis_in_flight_failed')}; first cached question not served as a hit after "
        f"{t('first_non_hit_after_redis_stop_s')} s. Valkey start — first hit again after "
        f"{t('first_hit_after_redis_start_s')} s. Postgres stop — {trans.get('postgres_in_flight', 0)} in flight, "
        f"failed: {kinds('postgres_in_flight_failed')}; first 503 after {t('first_503_after_postgres_stop_s')} s. "
        f"Postgres start (the command took {t('postgres_start_s')} s: crash recovery after the immediate stop) — "
        f"first successful fresh question after {t('first_ok_miss_after_postgres_start_s')} s; errors among "
        f"requests sent afterwards: {kinds('errors_after_postgres_start')}.",
        "",
        "![requests, errors and latency per second](fault_timeline.png)"
        if data.get("plot")
        else "(no plot: matplotlib is not installed; `pip install -e '.[bench]'`)",
        "",
    ]
    sec_rows = [
        [
            str(s["second"]),
            phase_of(s["second"], meta["phase"]),
            str(s["requests"]),
            str(s["errors"]),
            _f(s["ttft_p50_ms"], 1),
            _f(s["ttft_p50_hit_ms"], 1),
            _f(s["ttft_p50_gen_ms"]),
            ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items())),
            s["ready"],
        ]
        for s in seconds
    ]
    lines += [
        "<details><summary>Per second</summary>",
        "",
        markdown_table(
            ["s", "phase", "sent", "errors", "TTFT p50 all", "p50 hits", "p50 generated", "outcomes", "/ready"],
            sec_rows,
            "llrrrrrll",
        ),
        "",
        "</details>",
        "",
    ]
    warns = "; ".join(f"{k} ×{v}" for k, v in data.get("warnings", {}).items())
    lines += [f"Server log warnings/errors (digits collapsed to N): {warns or 'none'}.", ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path = PLOT) -> bool:
    try:
        import matplotlib
    except ImportError:
        say("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = data["seconds"]
    xs = [s["second"] for s in seconds]
    groups = [
        ("hit", ("hit",), "#2e7d32"),
        ("semantic hit", ("semantic_hit",), "#81c784"),
        ("generated (miss)", ("miss", "coalesced"), "#1565c0"),
        ("503", ("503",), "#ef6c00"),
        ("other error", ("error",), "#c62828"),
    ]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 8), sharex=True, height_ratios=[3, 1.4, 2])
    bottom = [0.0] * len(xs)
    for label, keys, color in groups:
        ys = [float(sum(s["outcomes"].get(k, 0) for k in keys)) for s in seconds]
        if any(ys):
            ax1.bar(xs, ys, bottom=bottom, width=1.0, align="edge", color=color, label=label, linewidth=0, zorder=2)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax1.set_ylabel("requests / s\n(by outcome)")
    ax1.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=5, fontsize=8, frameon=False)
    ax1.set_ylim(0, max([*bottom, 1]) * 1.2)
    rate = [100.0 * s["errors"] / s["requests"] if s["requests"] else 0.0 for s in seconds]
    ax2.step(xs, rate, where="post", color="#c62828")
    ax2.set_ylabel("error rate %")
    ax2.set_ylim(-3, 103)
    for key, label, color in (
        ("ttft_p50_hit_ms", "p50 TTFT, hits", "#2e7d32"),
        ("ttft_p50_gen_ms", "p50 TTFT, generated", "#1565c0"),
    ):
        ax3.plot(xs, [s[key] for s in seconds], label=label, color=color, marker=".", markersize=3, linewidth=1)
    ax3.plot(
        xs,
        [s["latency_p50_ms"] for s in seconds],
        label="p50 time to response end, all",
        color="#757575",
        linewidth=0.8,
        linestyle="--",
    )
    ax3.set_yscale("log")
    ax3.set_ylabel("ms (log)")
    ax3.set_xlabel("seconds since the load started")
    ax3.legend(loc="upper right", fontsize=8, ncols=3)
    began = {e["event"]: e["at"] for e in data["events"]}
    ready = {e["event"]: e["done"] for e in data["events"]}
    spans = [
        ("stop redis", "start redis", "Valkey down", "#ffcdd2"),
        ("stop postgres", "start postgres", "Postgres down", "#bbdefb"),
    ]
    for start, end, label, color in spans:
        if start in began and end in ready:  # from the stop command's start to the start command's end
            for ax in (ax1, ax2, ax3):
                ax.axvspan(began[start], ready[end], color=color, alpha=0.6, linewidth=0, zorder=0)
            ax1.text(
                (began[start] + ready[end]) / 2, ax1.get_ylim()[1] * 0.95, label, ha="center", va="top", fontsize=9
            )
    meta = data["meta"]
    fig.suptitle(
        f"rag-serve under {meta['rate']:g} req/s ({meta['hit_share']:.0%} cached questions) while Valkey, "
        "then Postgres, go down and come back",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace) -> None:
    run_dir = RESULTS / "fault_timeline" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    cached = passage_questions(HIT_POOL, prefix=HIT_PREFIX, skip=3)
    fresh = passage_questions(int(args.rate * args.phase * len(PHASES)) + 10, prefix=MISS_PREFIX, skip=5)
    own = OwnServers(DATA)
    try:
        dsn, documents = await ensure_corpus(own.servers, args.limit_corpus, data_dir=DATA)
        token = await create_key(dsn, "bench-fault")
        redis_url = own.valkey.url
        client = redis.Redis.from_url(redis_url)
        client.flushdb()  # a run starts cold: no answers from the previous one
        client.close()
        async with ProviderProcess(args.first_token_delay, args.token_interval, args.answer_tokens) as provider:
            log = run_dir / "rag-serve.log"
            async with rag_serve(
                dsn=dsn, redis_url=redis_url, provider_url=provider.base_url, log=log, data_dir=DATA
            ) as server:
                target = Target(server.url, token)
                say(f"warming the cache with {HIT_POOL} questions")
                await warm_cache(target, cached)
                load_before, busy = load_average(), busy_processes()
                say(f"== {args.rate:g} req/s for {args.phase * len(PHASES):.0f} s; faults every {args.phase:g} s")
                sent, ready, events, t0 = await timeline(target, own, args, cached, fresh)
                load_after = load_average()
    finally:
        own.close()
    seconds = per_second(sent, ready, int(args.phase * len(PHASES)))
    data: dict[str, Any] = {
        "meta": {
            "command": "python -m bench.fault_timeline" + (" " + " ".join(args.argv) if args.argv else ""),
            "date": now_stamp(),
            "machine": machine_line(),
            "revision": revision(),
            "documents": documents,
            "rate": args.rate,
            "hit_share": args.hit_share,
            "phase": args.phase,
            "first_token_delay": args.first_token_delay,
            "token_interval": args.token_interval,
            "answer_tokens": args.answer_tokens,
            "load_before": load_text(load_before),
            "load_after": load_text(load_after),
            "busy": busy,
        },
        "events": events,
        "phases": summarise(sent, args.phase),
        "seconds": seconds,
        "transitions": transitions(sent, events, t0),
        "checks": checks(sent, events, t0, args.phase * len(PHASES)),
        "warnings": warnings_in(log),
        "requests": [asdict(x.result) | {"second": x.second, "kind": x.kind} for x in sent],
    }
    data["plot"] = False if args.no_plot else plot(data, run_dir / "fault_timeline.png")
    (run_dir / "summary.json").write_text(json.dumps(data, indent=1, default=str))
    finish(data, args.no_write, run_dir)


def finish(data: dict[str, Any], no_write: bool, run_dir: Path | None = None) -> None:
    body = report(data)
    print(body)
    if run_dir is not None:
        say(f"raw results: {run_dir / 'summary.json'}")
    if not no_write:
        if data.get("plot"):
            plot(data, PLOT)
            say(f"wrote {PLOT.relative_to(ROOT)}")
        update_section(SECTION, body)
        say(f"wrote section “{SECTION}” of docs/benchmarks.md")


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.fault_timeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20, help="requests per second (open loop)")
    parser.add_argument("--hit-share", type=float, default=0.7, help="share of requests for cached questions")
    parser.add_argument("--phase", type=float, default=30, help="seconds between faults")
    parser.add_argument("--limit-corpus", type=int, default=1000, help="msmarco passages to ingest")
    parser.add_argument("--first-token-delay", type=float, default=0.3, help="seconds")
    parser.add_argument("--token-interval", type=float, default=0.02, help="seconds")
    parser.add_argument("--answer-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md or the plot")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--report-from", type=Path, help="only re-render from a saved summary.json")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.report_from:
        data = json.loads(args.report_from.read_text())
        if not args.no_plot:
            data["plot"] = plot(data, args.report_from.parent / "fault_timeline.png")
        finish(data, args.no_write)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
