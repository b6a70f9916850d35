"""Cache-hit throughput and latency of `/rag/stream` against a floor, side by side in one run.

Two servers, each `uvicorn --workers 1 --loop uvloop --http httptools --no-access-log`: the project
(`service.http.app:app_factory` over embedded Postgres + Valkey with `examples/` ingested and one hit
warmed) and the floor (`bench.hit_path:floor_app`: one Redis GET of the project's cached SSE bytes,
returned as they are). Per level and round both are loaded alternately by keep-alive clients
(tests.support.load) that check every response is a complete hit. Then, unless
`--no-profile`, both apps run in-process through ASGI: CPU per hit, a cProfile breakdown by package,
and what garbage collection costs in a process that holds the embedding model.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import itertools
import json
import os
import pstats
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response

from bench import _kit as kit
from tests.support.asgi import asgi_request
from tests.support.demo import ingest_examples
from tests.support.processes import Served, clean_env, serve_process
from tests.support.servers import free_port
from tests.support.sse import first_event

QUESTION = "How do I flush the cache?"
FLOOR_KEY = "bench:floor:hit"
GOAL_RPS_RATIO, GOAL_P99_RATIO = 0.8, 2.0
SECTION = "Hit path"
LOGS = kit.RESULTS / "hit_path"
UVICORN_FLAGS = "--host 127.0.0.1 --workers 1 --log-level warning --no-access-log --loop uvloop --http httptools"


def floor_app(redis_url: str | None = None) -> FastAPI:
    """The floor: one Redis GET, the stored bytes back as an event stream. Nothing else."""
    import redis.asyncio as aioredis

    url = redis_url or os.environ["BENCH_FLOOR_REDIS_URL"]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)  # as the app's
        yield
        await app.state.redis.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/rag/stream")
    async def stream(request: Request) -> Response:
        await request.body()
        raw = await request.app.state.redis.get(FLOOR_KEY)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-ID": uuid.uuid4().hex}
        return Response(raw, media_type="text/event-stream", headers=headers)

    return app


def is_hit(body: bytes) -> bool:
    """A complete replayed answer: first event `meta` with cache "hit", and a `done` event."""
    try:
        first = first_event(body)
    except ValueError:
        return False
    return first is not None and first[0] == "meta" and first[1].get("cache") == "hit" and b"event: done" in body


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    side: str
    concurrency: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    client_cpu: float = 0.0
    server_cpu: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def longest_stall(self) -> float:
        """Longest time in which no response completed: a pause of the whole server (e.g. a full GC)."""
        return max((b - a for a, b in itertools.pairwise(sorted(self.completions))), default=0.0)


async def measure(name: str, server: Served, args: Any, token: str, c: int) -> Run:
    """One side at one level: `c` keep-alive clients sending a pre-built request, warmed up, then measured with both
    processes' CPU; latency is request sent → full body read."""
    run = Run(name, c)
    clients = [kit.Client(server.url, kit.bearer(token)) for _ in range(c)]
    raw = clients[0].encode("POST", "/rag/stream", json.dumps({"question": QUESTION}).encode(), close=False)

    async def send(client: kit.Client) -> kit.Reply:
        return await client.request("POST", "/rag/stream", raw=raw, limit_s=30)  # a broken connection reopens

    await kit.closed_loop(clients, args.warmup, send)
    cpu0, server0, t0 = time.process_time(), cpu_seconds(server.pid), time.perf_counter()
    replies = await kit.closed_loop(clients, args.duration, send)
    run.seconds = time.perf_counter() - t0
    run.client_cpu = time.process_time() - cpu0
    run.server_cpu = cpu_seconds(server.pid) - server0
    for reply in replies:
        if reply.status == 200 and is_hit(reply.body):
            run.latencies.append(reply.total_s)
            run.completions.append(reply.started + reply.total_s)
        else:
            run.errors.append(f"status {reply.status}: {reply.client_error or reply.body[:160]!r}")
    for client in clients:
        client.close()
    return run


COLUMNS = "concurrency | server | requests | errors | req/s | p50 ms | p99 ms"
CPU_COLUMNS = "server CPU µs/req | server CPU | client CPU | longest stall ms"
RATIO_COLUMNS = "req/s project/floor | per round | p50 project/floor | p99 project/floor | CPU/req project/floor"
GOAL = f"≥ {GOAL_RPS_RATIO} × req/s, p99 ≤ {GOAL_P99_RATIO:g} ×"


def report(runs: list[Run], args: Any) -> str:
    rows, ratios = [], []
    for c in args.concurrency:
        side = {n: [r for r in runs if r.concurrency == c and r.side == n] for n in ("project", "floor")}
        agg = {}
        for name, rs in side.items():
            lat, secs = [x for r in rs for x in r.latencies], sum(r.seconds for r in rs)
            cpu_us = sum(r.server_cpu for r in rs) / max(len(lat), 1) * 1e6
            agg[name] = kit.stats(lat) | {"rps": len(lat) / secs, "cpu_us": cpu_us}
            rows.append(
                f"{c} | {name} | {len(lat):,} | {sum(len(r.errors) for r in rs)} | {agg[name]['rps']:,.0f} | "
                f"{kit.ms(agg[name]['p50'])} | {kit.ms(agg[name]['p99'])} | {agg[name]['cpu_us']:,.0f} | "
                f"{sum(r.server_cpu for r in rs) / secs:.0%} | {sum(r.client_cpu for r in rs) / secs:.0%} | "
                f"{kit.ms(max(r.longest_stall for r in rs))}"
            )
        p, f = agg["project"], agg["floor"]
        rps, p99 = p["rps"] / f["rps"], p["p99"] / f["p99"]
        per_round = [a.rps / b.rps for a, b in zip(side["project"], side["floor"], strict=True) if b.rps]
        met = rps >= GOAL_RPS_RATIO and p99 <= GOAL_P99_RATIO
        ratios.append(
            f"{c} | **{rps:.2f}** | {min(per_round):.2f}–{max(per_round):.2f} | {p['p50'] / f['p50']:.2f} | "
            f"**{p99:.2f}** | {p['cpu_us'] / f['cpu_us']:.2f} | {'met' if met else '**not met**'}"
        )
    samples = list({e[:40]: e for r in runs for e in r.errors}.values())[:5]
    return "\n\n".join(
        [
            kit.table(f"{COLUMNS} | {CPU_COLUMNS}", rows, "rl"),
            kit.table(f"concurrency | {RATIO_COLUMNS} | goal ({GOAL})", ratios, "rrrrrrl"),
            f"Error samples: {'; '.join(f'`{s}`' for s in samples) or 'none'}.",
        ]
    )


# --------------------------------------------------------------------------- in-process profile


# Self time by package: a built-in's time (dict.get, isinstance …) goes to its callers' packages.
PACKAGES = {
    "project code (service/)": ("/service/",),
    "sse-starlette + anyio": ("sse_starlette", "/anyio/", "/sniffio/"),
    "FastAPI": ("/fastapi/",),
    "Starlette": ("/starlette/",),
    "pydantic": ("/pydantic", "pydantic_core"),
    "redis-py client": ("/redis/",),
    "json (stdlib)": ("/json/",),
    "tiktoken": ("tiktoken",),
    "asyncio event loop, tasks": ("/asyncio/", "uvloop"),
    "benchmark's ASGI shim (same on both sides)": ("/bench/", "/tests/support/"),
}
OTHER = "other (stdlib: re, unicodedata, email, hashlib, uuid, logging …)"


def by_package(stats: pstats.Stats) -> dict[str, float]:
    def label(filename: str) -> str:
        return next((k for k, needles in PACKAGES.items() if any(n in filename for n in needles)), OTHER)

    totals: dict[str, float] = {}
    for (filename, _l, _f), (_cc, _nc, tt, _ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if filename == "~" and callers:
            for (caller, _l2, _f2), edge in callers.items():
                totals[label(caller)] = totals.get(label(caller), 0.0) + edge[2]
        else:
            totals[label(filename)] = totals.get(label(filename), 0.0) + tt
    return totals


def heaviest(stats: pstats.Stats, n: int = 8) -> list[tuple[str, float]]:
    """The project's functions with the most cumulative CPU per call chain (coroutines only while they run)."""
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    found = [(f"{f.split('/service/')[1]}:{line} {fn}", v[3]) for (f, line, fn), v in raw.items() if "/service/" in f]
    return sorted(found, key=lambda x: -x[1])[:n]


async def profile_in_process(settings: Any, embedder: Any, token: str, n: int) -> str:
    from service.http.app import create_app

    apps = {"project": create_app(settings, embedder=embedder), "floor": floor_app(str(settings.redis_url))}
    payload = json.dumps({"question": QUESTION}).encode()
    headers = {"content-type": "application/json", **kit.bearer(token)}

    async def hits(app: Any, count: int) -> list[tuple[int, bytes]]:
        """`count` sequential POST /rag/stream straight through the ASGI interface: no sockets, no uvicorn."""
        return [await asgi_request(app, "POST", "/rag/stream", payload, headers) for _ in range(count)]

    cpu: dict[str, float] = {}
    profiles: dict[str, pstats.Stats] = {}
    async with (
        apps["project"].router.lifespan_context(apps["project"]),
        apps["floor"].router.lifespan_context(apps["floor"]),
    ):
        for name, app in apps.items():
            for status, body in await hits(app, 200):  # warm-up, and a check that both really answer hits
                if status != 200 or not is_hit(body):
                    raise SystemExit(f"in-process {name}: not a hit: {status} {body[:200]!r}")
        for _ in range(2):
            for name, app in apps.items():
                started = time.process_time()
                await hits(app, n)
                cpu[name] = min(cpu.get(name, 1e9), (time.process_time() - started) / n)
        for name, app in apps.items():
            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
            await hits(app, n)
            profiler.disable()
            profiles[name] = pstats.Stats(profiler)
            profiles[name].dump_stats(str(LOGS / f"{name}_hit.prof"))
        gc_line = await gc_pauses(lambda: hits(apps["project"], 1), hits=64 * max(1, n // 32))
    # cProfile inflates times: scale each app's numbers to its unprofiled CPU per hit (approximate).
    scale = {k: cpu[k] / profiles[k].total_tt for k in apps}  # type: ignore[attr-defined]
    packages = {k: by_package(profiles[k]) for k in apps}
    package_rows = [
        [label, *(f"{packages[k].get(label, 0.0) * scale[k] * 1e6:,.0f}" for k in apps)]
        for label in [*PACKAGES, OTHER]
        if any(packages[k].get(label, 0.0) * scale[k] >= 0.5e-6 for k in apps)
    ]
    package_rows.append(["**total CPU per hit (unprofiled)**", *(f"**{cpu[k] * 1e6:,.0f}**" for k in apps)])
    steps = [[name, f"{v * scale['project'] * 1e6:,.0f}"] for name, v in heaviest(profiles["project"])]
    return "\n\n".join(
        [
            f"In-process, through ASGI, {n} sequential hits per app: CPU µs per hit (best of 2), and cProfile "
            f"scaled to it. Profiles: `bench/results/hit_path/{{project,floor}}_hit.prof`.",
            kit.table("self time by package | project µs/hit | floor µs/hit", package_rows),
            kit.table("project function (cumulative) | µs/hit", steps),
            gc_line,
        ]
    )


async def gc_pauses(hit: Callable[[], Awaitable[object]], hits: int, concurrency: int = 64) -> str:
    """Heap size and the collector's pauses while hits run concurrently, in a process holding the model."""
    frozen, tracked = gc.get_freeze_count(), len(gc.get_objects())
    started = time.perf_counter()
    gc.collect()
    full = time.perf_counter() - started
    pauses: list[tuple[int, float]] = []
    began = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - began[0]))

    async def worker() -> None:
        for _ in range(hits // concurrency):
            await hit()

    gc.callbacks.append(callback)
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        gc.callbacks.remove(callback)
    return (
        f"Garbage collection: {frozen:,} objects frozen at startup, {tracked:,} still tracked; a full collection "
        f"takes {full * 1000:.0f} ms; during {hits:,} hits at concurrency {concurrency} the collector ran "
        f"{len(pauses)} times ({sum(g == 2 for g, _ in pauses)} full), longest pause "
        f"{max((p for _, p in pauses), default=0.0) * 1000:.1f} ms."
    )


async def bench(args: Any) -> str:
    """Embedded Postgres + Valkey in a temp dir, `examples/` ingested, both servers up and one hit warmed; then each
    level and round, side by side, and the in-process profile."""
    import redis

    from service.embeddings.encoders import LocalEmbedder

    first = kit.run_line(args.command)
    with kit.embedded_servers(None) as db:
        settings, embedder = kit.make_settings(db.admin_dsn, db.redis_base, db.data_dir), LocalEmbedder()
        await ingest_examples(settings, embedder)
        token = await kit.create_key(db.admin_dsn)
        project_env = {"DATABASE_URL": db.admin_dsn, "REDIS_URL": db.redis_base, "RAG_DATA_DIR": str(db.data_dir)}
        apps = {
            "project": ("service.http.app:app_factory", clean_env(RAG_LOG_LEVEL="warning", **project_env)),
            "floor": ("bench.hit_path:floor_app", clean_env(BENCH_FLOOR_REDIS_URL=db.redis_base)),
        }
        kit.say("starting both servers (the project loads the embedding model first)")
        servers: dict[str, Served] = {}
        async with contextlib.AsyncExitStack() as stack:
            for name, (target, env) in apps.items():
                port = free_port()
                command = f"{sys.executable} -m uvicorn {target} --factory --port {port} {UVICORN_FLAGS}"
                servers[name] = await stack.enter_async_context(
                    serve_process(command, port, env, LOGS / f"{name}.log", kit.ROOT)
                )
            for _ in range(2):
                reply = await kit.ask(servers["project"].url, token, {"question": QUESTION})
            if not is_hit(reply.body):
                raise SystemExit(f"the second request was not a cache hit: {reply.status} {reply.body[:300]!r}")
            with redis.Redis.from_url(db.redis_base) as client:
                client.set(FLOOR_KEY, reply.body)
            runs: list[Run] = []
            for c in args.concurrency:
                for rnd in range(1, args.rounds + 1):
                    for name in ["project", "floor"][:: 1 if rnd % 2 else -1]:
                        runs.append(run := await measure(name, servers[name], args, token, c))
                        kit.say(f"c={c:<3} round {rnd} {name:8} {run.rps:8,.0f} req/s  errors {len(run.errors)}")
            setup = (
                "Both servers `uvicorn --workers 1 --loop uvloop --http httptools --no-access-log`; tests.support.load "
                f"client, one keep-alive connection per concurrent request, every body checked; {args.rounds} rounds × "
                f"{args.duration:g} s per side and level after {args.warmup:g} s warm-up, order alternating; cached "
                f"response {len(reply.body):,} bytes; API key without `rpm` or `tokens_per_day`."
            )
            profile = await profile_in_process(settings, embedder, token, args.profile_requests) if args.profile else ""
    return "\n\n".join(
        x for x in [f"{first} Load average after: {kit.load_text()}.", setup, report(runs, args), profile] if x
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.arguments("hit_path", __doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per side per round")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each measurement")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--profile-requests", type=int, default=2000)
    args = kit.parse(parser, argv, concurrency=[4], rounds=1, duration=0.5, warmup=0.2, profile_requests=100)
    import uvloop

    kit.publish(SECTION, uvloop.run(bench(args)), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
