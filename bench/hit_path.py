"""Cache-hit throughput and latency of `/rag/stream` against a floor, side by side in one run.

    python -m bench.hit_path [--concurrency 1 16 64] [--rounds 3] [--duration 3] [--client raw|httpx]
                             [--no-profile] [--no-write]

Setup: embedded Postgres + Valkey in a temp dir, `examples/` ingested, one API key created
(no `rpm`, no `tokens_per_day`: the default path, where a hit authenticates from the worker's
in-process key cache and makes no rate-limit call), one cache hit warmed for a fixed question.
Two servers, each `uvicorn … --workers 1` in its own process with the same flags (uvloop + httptools, access log off):

- project: `service.http.app:app_factory` (the real app, real settings from the environment);
- floor:   `bench.hit_path:floor_app`, a bare FastAPI POST endpoint that reads the body, does
           one Redis GET (same Valkey, same redis-py client settings) of a value holding the
           exact bytes of the project's cached SSE response, and returns them as
           text/event-stream. It gets the same request bytes (key included) and ignores the key.

Per concurrency level and round, project and floor are loaded alternately (the order flips
every round) for a fixed number of seconds after a short warm-up, by keep-alive clients
that read every full body. Every response is checked: status 200, first event `meta` with
`"cache": "hit"`, a `done` event. Anything else counts as an error. "Longest stall" is the
longest time in which no response completed at all: a pause of the whole server process.

The default client is a minimal HTTP/1.1 keep-alive client on uvloop streams (much cheaper
per request than httpx, so it does not become the bottleneck on a small machine); its CPU
use is reported next to the servers' CPU time per request. `--client httpx` uses
httpx.AsyncClient instead, as a cross-check.

Then (unless `--no-profile`) both apps run in-process, driven straight through ASGI (no
sockets, no uvicorn): CPU per hit of each, a cProfile breakdown by component, and what
garbage collection costs in a process that holds the embedding model (the app's lifespan
freezes what startup leaves, `gc.freeze()`, so the collector no longer walks the model).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import itertools
import json
import os
import pstats
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response

from bench.common import (
    RESULTS,
    ROOT,
    bearer,
    clean_env,
    create_key,
    free_port,
    load_text,
    machine_line,
    markdown_table,
    ms,
    nproc,
    percentile,
    publish,
    revision,
    say,
    sse_events,
    today,
)

QUESTION = "How do I flush the cache?"
FLOOR_KEY = "bench:floor:hit"
GOAL_RPS_RATIO = 0.8
GOAL_P99_RATIO = 2.0
SECTION = "Hit path"
UVICORN_FLAGS = [
    "--workers",
    "1",
    "--log-level",
    "warning",
    "--no-access-log",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
]


# --------------------------------------------------------------------------- the floor


def floor_app(redis_url: str | None = None, key: str | None = None) -> FastAPI:
    """The floor: one Redis GET, the stored bytes back as an event stream. Nothing else."""
    import redis.asyncio as aioredis

    url = redis_url or os.environ["BENCH_FLOOR_REDIS_URL"]
    stored_key = key or os.environ.get("BENCH_FLOOR_KEY", FLOOR_KEY)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The same client settings as service.http.app's lifespan.
        app.state.redis = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            yield
        finally:
            await app.state.redis.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/rag/stream")
    async def stream(request: Request) -> Response:
        await request.body()
        raw = await request.app.state.redis.get(stored_key)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-ID": uuid.uuid4().hex}
        return Response(raw, media_type="text/event-stream", headers=headers)

    return app


# --------------------------------------------------------------------------- verification


def is_hit(body: bytes) -> bool:
    """A complete replayed answer: first event `meta` with cache "hit", and a `done` event."""
    if not body.startswith(b"event: meta"):
        return False
    first = body.split(b"\n", 2)
    if len(first) < 3 or not first[1].startswith(b"data:"):
        return False
    try:
        meta = json.loads(first[1][5:])
    except ValueError:
        return False
    return bool(meta.get("cache") == "hit" and b"event: done" in body)


# --------------------------------------------------------------------------- clients


class RawConnection:
    """Minimal HTTP/1.1 keep-alive client: a pre-built request, Content-Length or chunked body."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        try:
            return await self._request(raw)
        except BaseException:
            await self.close()  # a broken or half-read connection is never reused
            raise

    async def _request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            parts: list[bytes] = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")  # no trailers from uvicorn
                    break
                parts.append((await self.reader.readexactly(size + 2))[:-2])
            body = b"".join(parts)
        else:
            found = re.search(rb"content-length:\s*(\d+)", lower)
            body = await self.reader.readexactly(int(found.group(1))) if found else b""
        if b"connection: close" in lower:
            await self.close()
        return status, body


def raw_request(host: str, port: int, path: str, payload: bytes, token: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"accept: text/event-stream\r\nauthorization: Bearer {token}\r\ncontent-length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


Send = Callable[[], Awaitable[tuple[int, bytes]]]


@asynccontextmanager
async def client_pool(kind: str, base: str, path: str, payload: bytes, token: str, n: int) -> AsyncIterator[list[Send]]:
    """`n` independent senders (one keep-alive connection each), all sending the API key `token`."""
    host, port = base.removeprefix("http://").split(":")
    if kind == "raw":
        conns = [RawConnection(host, int(port)) for _ in range(n)]
        await asyncio.gather(*(c.open() for c in conns))
        request = raw_request(host, int(port), path, payload, token)

        def raw_sender(conn: RawConnection) -> Send:
            return lambda: conn.request(request)

        try:
            yield [raw_sender(c) for c in conns]
        finally:
            await asyncio.gather(*(c.close() for c in conns))
        return
    import httpx

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    headers = {"content-type": "application/json", "accept": "text/event-stream", **bearer(token)}
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0, headers=headers) as client:

        async def httpx_send() -> tuple[int, bytes]:
            response = await client.post(path, content=payload)
            return response.status_code, response.content

        yield [httpx_send] * n


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    target: str
    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "uvicorn", self.target, "--factory", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), *UVICORN_FLAGS]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    async def wait_ready(self, within: float = 240.0) -> None:
        import httpx

        assert self.process is not None
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(base_url=self.base, timeout=2.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise SystemExit(f"{self.name} server exited ({self.process.returncode}); see {self.log}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/health")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise SystemExit(f"{self.name} server not ready after {within:.0f}s; see {self.log}")
                await asyncio.sleep(0.2)

    def cpu_seconds(self) -> float:
        """user + system CPU time of the server process so far (from /proc)."""
        assert self.process is not None
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --------------------------------------------------------------------------- load


@dataclass
class Run:
    side: str
    concurrency: int
    round: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    client_cpu: float = 0.0  # seconds of this process's CPU during the run
    server_cpu: float = 0.0
    completions: list[float] = field(default_factory=list)  # perf_counter at each verified response

    def note_error(self, sample: str) -> None:
        self.errors += 1
        kind = sample[:40]
        if len(self.error_samples) < 5 and not any(s.startswith(kind) for s in self.error_samples):
            self.error_samples.append(sample)

    @property
    def longest_stall(self) -> float:
        """Longest time in which no response completed: a pause of the whole server (e.g. a full GC)."""
        times = sorted(self.completions)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


async def drive(senders: Sequence[Send], seconds: float, run: Run | None) -> None:
    """Every sender loops until the deadline; latency is request sent → full body read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def worker(send: Send) -> None:
        while loop.time() < deadline:
            started = time.perf_counter()
            try:
                status, body = await send()
            except Exception as exc:  # a broken connection is an error, not the end of the run
                if run is not None:
                    run.note_error(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - started
            if run is None:
                continue
            if status == 200 and is_hit(body):
                run.latencies.append(elapsed)
                run.completions.append(started + elapsed)
            else:
                run.note_error(f"status {status}: {body[:160]!r}")

    await asyncio.gather(*(worker(s) for s in senders))


async def measure(
    server: Server, client: str, payload: bytes, token: str, concurrency: int, rnd: int, seconds: float, warmup: float
) -> Run:
    run = Run(server.name, concurrency, rnd)
    async with client_pool(client, server.base, "/rag/stream", payload, token, concurrency) as senders:
        await drive(senders, warmup, None)
        cpu0, server0, t0 = time.process_time(), server.cpu_seconds(), time.perf_counter()
        await drive(senders, seconds, run)
        run.seconds = time.perf_counter() - t0
        run.client_cpu = time.process_time() - cpu0
        run.server_cpu = server.cpu_seconds() - server0
    return run


# --------------------------------------------------------------------------- setup


@dataclass
class Stack:
    data_dir: Path
    postgres: Any
    valkey: Any
    project: Server
    floor: Server
    embedder: Any = None
    hit_body: bytes = b""
    token: str = ""  # the bench's API key: no rpm, no token budget


async def setup(args: argparse.Namespace) -> Stack:
    import redis

    from bench.common import ingest_path, make_settings
    from service.embedded import start_postgres, start_valkey
    from service.embeddings.encoders import LocalEmbedder

    data_dir = Path(tempfile.mkdtemp(prefix="ragbench-hit-"))
    logs = RESULTS / "hit_path"
    logs.mkdir(parents=True, exist_ok=True)
    say(f"data dir {data_dir}; starting embedded Postgres and Valkey")
    pg = start_postgres(data_dir)
    valkey = start_valkey(data_dir)
    stack = Stack(
        data_dir,
        pg,
        valkey,
        Server("project", "", {}, logs / "project.log"),
        Server("floor", "", {}, logs / "floor.log"),
    )
    try:
        settings = make_settings(pg.url, valkey.url, data_dir)
        say("ingesting examples/ (source handbook)")
        stack.embedder = LocalEmbedder()
        report = await ingest_path(settings, stack.embedder, ROOT / "examples", source="handbook")
        say(f"  {report.added} documents, {report.chunks} chunks")
        stack.token = await create_key(pg.url, "bench-hit-path")

        stack.project = Server(
            "project",
            "service.http.app:app_factory",
            clean_env(DATABASE_URL=pg.url, REDIS_URL=valkey.url, RAG_DATA_DIR=str(data_dir), RAG_LOG_LEVEL="warning"),
            logs / "project.log",
        )
        stack.floor = Server(
            "floor",
            "bench.hit_path:floor_app",
            clean_env(BENCH_FLOOR_REDIS_URL=valkey.url, BENCH_FLOOR_KEY=FLOOR_KEY),
            logs / "floor.log",
        )
        stack.project.start()
        stack.floor.start()
        say("waiting for both servers (the project loads the embedding model at startup)")
        await asyncio.gather(stack.project.wait_ready(), stack.floor.wait_ready())

        import httpx

        headers = bearer(stack.token)
        async with httpx.AsyncClient(base_url=stack.project.base, timeout=120.0, headers=headers) as client:
            first = await client.post("/rag/stream", json={"question": QUESTION})
            if first.status_code != 200:
                raise SystemExit(f"warming request failed: {first.status_code} {first.text[:300]}")
            outcome = sse_events(first.content)[0][1].get("cache")
            second = await client.post("/rag/stream", json={"question": QUESTION})
        if not is_hit(second.content):
            raise SystemExit(f"second request was not a cache hit (first: {outcome}): {second.content[:300]!r}")
        stack.hit_body = second.content
        say(f"warmed: first request {outcome}, then hit; cached SSE response is {len(stack.hit_body)} bytes")
        client_sync = redis.Redis.from_url(valkey.url)
        client_sync.set(FLOOR_KEY, stack.hit_body)
        client_sync.close()
    except BaseException:
        teardown(stack)
        raise
    return stack


def teardown(stack: Stack) -> None:
    for server in (stack.project, stack.floor):
        server.stop()
    stack.valkey.stop()
    stack.postgres.stop()
    shutil.rmtree(stack.data_dir, ignore_errors=True)


# --------------------------------------------------------------------------- report


@dataclass
class Side:
    runs: list[Run]

    @property
    def latencies(self) -> list[float]:
        return [x for r in self.runs for x in r.latencies]

    @property
    def requests(self) -> int:
        return sum(len(r.latencies) for r in self.runs)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def rps(self) -> float:
        seconds = sum(r.seconds for r in self.runs)
        return self.requests / seconds if seconds else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def longest_stall(self) -> float:
        return max((r.longest_stall for r in self.runs), default=0.0)

    @property
    def client_cpu_share(self) -> float:
        return sum(r.client_cpu for r in self.runs) / sum(r.seconds for r in self.runs)

    @property
    def server_cpu_share(self) -> float:
        return sum(r.server_cpu for r in self.runs) / sum(r.seconds for r in self.runs)

    @property
    def server_cpu_per_request_us(self) -> float:
        return sum(r.server_cpu for r in self.runs) / max(self.requests, 1) * 1e6


def render(
    runs: list[Run], args: argparse.Namespace, command: str, body_bytes: int, loads: tuple[str, str], profile: str
) -> str:
    levels = list(dict.fromkeys(r.concurrency for r in runs))
    rows, ratio_rows, detail_rows = [], [], []
    verdicts: list[bool] = []
    for c in levels:
        sides = {
            name: Side([r for r in runs if r.concurrency == c and r.side == name]) for name in ("project", "floor")
        }
        for name, side in sides.items():
            rows.append(
                [
                    str(c),
                    name,
                    f"{side.requests:,}",
                    str(side.errors),
                    f"{side.rps:,.0f}",
                    ms(side.p(50)),
                    ms(side.p(99)),
                    f"{side.server_cpu_per_request_us:,.0f}",
                    f"{side.server_cpu_share:.0%}",
                    f"{side.client_cpu_share:.0%}",
                    ms(side.longest_stall),
                ]
            )
        proj, floor = sides["project"], sides["floor"]
        rps_ratio = proj.rps / floor.rps if floor.rps else float("nan")
        p99_ratio = proj.p(99) / floor.p(99) if floor.latencies else float("nan")
        met = rps_ratio >= GOAL_RPS_RATIO and p99_ratio <= GOAL_P99_RATIO
        verdicts.append(met)
        per_round = [
            p.rps / f.rps
            for p, f in zip(proj.runs, floor.runs, strict=True)
            if f.rps  # rounds are paired by index: same concurrency, adjacent in time
        ]
        ratio_rows.append(
            [
                str(c),
                f"**{rps_ratio:.2f}**",
                f"{min(per_round):.2f}–{max(per_round):.2f}",
                f"{proj.p(50) / floor.p(50):.2f}",
                f"**{p99_ratio:.2f}**",
                f"{proj.server_cpu_per_request_us / floor.server_cpu_per_request_us:.2f}",
                "met" if met else "**not met**",
            ]
        )
        for p, f in zip(proj.runs, floor.runs, strict=True):
            detail_rows.append(
                [str(c), str(p.round), f"{p.rps:,.0f}", f"{f.rps:,.0f}", f"{p.rps / f.rps:.2f}" if f.rps else "–"]
            )
    samples = list({s[:40]: s for r in runs for s in r.error_samples}.values())[:5]
    lines = [
        f"Command: `{command}`  ",
        f"Date: {today()}, commit {revision()}  ",
        f"Machine: {machine_line()}; load average (1/5/15 min) before {loads[0]}, after {loads[1]}  ",
        f"Setup: both servers `uvicorn --workers 1 --loop uvloop --http httptools --no-access-log`, one process "
        f"each; embedded Valkey (unix socket) shared; `{args.client}` client "
        f"({'minimal HTTP/1.1 keep-alive client on asyncio streams' if args.client == 'raw' else 'httpx.AsyncClient'}"
        f", one connection per concurrent request, full body read and verified); {args.rounds} rounds × "
        f"{args.duration:g} s per side and level after a {args.warmup:g} s warm-up, order alternating; cached SSE "
        f"response {body_bytes:,} bytes; every request carries an API key created without `rpm` or "
        "`tokens_per_day` (the default path: authentication from the worker's in-process key cache, no "
        "rate-limit call to Redis); floor = `bench.hit_path:floor_app` (one Redis GET, same bytes back, key "
        "ignored); project = `service.http.app:app_factory`.",
        "",
        markdown_table(
            [
                "concurrency",
                "server",
                "requests",
                "errors",
                "req/s",
                "p50 ms",
                "p99 ms",
                "server CPU µs/req",
                "server CPU",
                "client CPU",
                "longest stall ms",
            ],
            rows,
            "rlrrrrrrrrr",
        ),
        "",
        markdown_table(
            [
                "concurrency",
                "req/s project/floor",
                "per round",
                "p50 project/floor",
                "p99 project/floor",
                "CPU/req project/floor",
                f"goal (≥ {GOAL_RPS_RATIO} × req/s, p99 ≤ {GOAL_P99_RATIO:g} ×)",
            ],
            ratio_rows,
            "rrrrrrl",
        ),
        "",
        "Per round req/s (project / floor / ratio): "
        + "; ".join(f"c={d[0]} r{d[1]}: {d[2]} / {d[3]} / {d[4]}" for d in detail_rows),
    ]
    if samples:
        lines += ["", "Error samples: " + "; ".join(f"`{s}`" for s in samples)]
    lines += ["", interpretation(runs, verdicts)]
    if profile:
        lines += ["", profile]
    return "\n".join(lines)


def interpretation(runs: list[Run], verdicts: list[bool]) -> str:
    levels = list(dict.fromkeys(r.concurrency for r in runs))
    ratios = []
    for c in levels:
        proj = Side([r for r in runs if r.concurrency == c and r.side == "project"])
        floor = Side([r for r in runs if r.concurrency == c and r.side == "floor"])
        ratios.append(proj.rps / floor.rps if floor.rps else float("nan"))
    project_cpu = Side([r for r in runs if r.side == "project"]).server_cpu_per_request_us
    floor_cpu = Side([r for r in runs if r.side == "floor"]).server_cpu_per_request_us
    client = max(r.client_cpu / r.seconds for r in runs)
    errors = sum(r.errors for r in runs)
    met = sum(verdicts)
    cause = (
        f"spends {project_cpu / floor_cpu:.1f}× its server CPU per hit ({project_cpu:,.0f} vs {floor_cpu:,.0f} µs), "
        "so the gap is per-request CPU in the app's process"
        if project_cpu > 1.25 * floor_cpu
        else f"spends about the same server CPU per hit ({project_cpu:,.0f} vs {floor_cpu:,.0f} µs)"
    )
    return (
        f"Interpretation: goal met at {met} of {len(verdicts)} concurrency levels; the project serves "
        f"{min(ratios):.2f}–{max(ratios):.2f}× the floor's req/s and {cause}; the load client used at most "
        f"{client:.0%} of a core, so it is not the limit; {errors} failed or unverified responses."
    )


# --------------------------------------------------------------------------- in-process profile


async def asgi_post(app: Any, path: str, payload: bytes, token: str) -> tuple[int, bytes]:
    """One POST with the API key `token` straight through the ASGI interface: no sockets, no uvicorn."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"authorization", f"Bearer {token}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    delivered = False
    done = asyncio.Event()
    status = 0
    parts: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    return status, b"".join(parts)


# Self time by package: every function's own CPU time goes to the package of its file; a
# built-in's (dict.get, isinstance, str.encode …) goes to its callers' packages, edge by edge.
PACKAGES: list[tuple[str, tuple[str, ...]]] = [
    ("project code (service/)", ("/service/",)),
    ("sse-starlette + anyio (EventSourceResponse tasks, cancel scopes)", ("sse_starlette", "/anyio/", "/sniffio/")),
    ("FastAPI", ("/fastapi/",)),
    ("Starlette", ("/starlette/",)),
    ("pydantic", ("/pydantic", "pydantic_core")),
    ("redis-py client", ("/redis/",)),
    ("json (stdlib)", ("/json/",)),
    ("tiktoken", ("tiktoken",)),
    ("asyncio event loop, tasks", ("/asyncio/", "uvloop")),
    ("benchmark's ASGI shim (same on both sides)", ("/bench/",)),
]
OTHER = "other (stdlib: re, unicodedata, email, hashlib, uuid, logging …)"

# Steps of the project's hit path: cumulative CPU of one function. Coroutines count only while
# they run, so time spent waiting on Redis is not in them (the redis-py client's CPU is).
STEPS: list[tuple[str, str, str]] = [
    (
        "dependencies: API key + RagRequest validation (FastAPI solve_dependencies)",
        "fastapi/dependencies/utils.py",
        "solve_dependencies",
    ),
    (
        "  of which authentication (service/http/auth.py Authenticator.authenticate)",
        "service/http/auth.py",
        "authenticate",
    ),
    (
        "rate limit (service/redis/limits.py check_request: no Redis call without rpm)",
        "service/redis/limits.py",
        "check_request",
    ),
    ("guardrails (service/policy/guardrails.py check_question)", "service/policy/guardrails.py", "check_question"),
    ("  of which injection patterns (looks_like_injection)", "service/policy/injection.py", "looks_like_injection"),
    ("  of which token count (service/policy/tokens.py count_tokens)", "service/policy/tokens.py", "count_tokens"),
    ("cache key (service/redis/answer_cache.py cache_key)", "service/redis/answer_cache.py", "cache_key"),
    ("cache look-up (service/redis/answer_cache.py AnswerCache.get)", "service/redis/answer_cache.py", "get"),
    ("  of which redis-py execute_command", "redis/asyncio/client.py", "execute_command"),
    ("  of which CachedAnswer.loads", "service/redis/answer_cache.py", "loads"),
    ("replay → Meta/Token/Done with pydantic models (pipeline replay)", "service/answer/pipeline.py", "replay"),
    ("events → JSON → SSE bytes (service/http/rag.py sse_event)", "service/http/rag.py", "sse_event"),
    ("events → JSON → SSE, streaming generator (service/http/rag.py sse)", "service/http/rag.py", "sse"),
    ("EventSourceResponse.__init__ (– when hits skip it)", "sse_starlette/sse.py", "__init__"),
    (
        "metrics: record (Prometheus + buffer; service/observability/metrics.py)",
        "service/observability/metrics.py",
        "record",
    ),
    ("metrics: _write (MULTI to Redis, in its own task)", "service/observability/series.py", "_write"),
]


def _package(filename: str) -> str:
    for label, needles in PACKAGES:
        if any(n in filename for n in needles):
            return label
    return OTHER


def self_time_by_package(stats: pstats.Stats) -> dict[str, float]:
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    totals: dict[str, float] = {}
    for (filename, _line, _func), (_cc, _nc, tt, _ct, callers) in raw.items():
        if filename == "~" and callers:  # a built-in: charge each caller's package its share
            for (caller_file, _l, _f), edge in callers.items():
                label = _package(caller_file)
                totals[label] = totals.get(label, 0.0) + edge[2]
        else:
            label = _package(filename)
            totals[label] = totals.get(label, 0.0) + tt
    return totals


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> float | None:
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    found = [
        ct
        for (filename, _l, func), (_cc, _nc, _tt, ct, _c) in raw.items()
        if filename.endswith(suffix) and func == name
    ]
    return sum(found) if found else None


GC_HITS = 4096
GC_CONCURRENCY = 64


async def gc_pauses(app: Any, payload: bytes, token: str) -> list[str]:
    """How big the heap is and what the collector's pauses cost while hits run concurrently."""
    frozen = gc.get_freeze_count()
    tracked = len(gc.get_objects())
    started = time.perf_counter()
    gc.collect()
    full = time.perf_counter() - started
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    began: list[float] = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - began[0])

    async def worker() -> None:
        for _ in range(GC_HITS // GC_CONCURRENCY):
            await asgi_post(app, "/rag/stream", payload, token)

    gc.callbacks.append(callback)
    try:
        await asyncio.gather(*(worker() for _ in range(GC_CONCURRENCY)))
    finally:
        gc.callbacks.remove(callback)
    every = [p for v in pauses.values() for p in v]
    return [
        f"{frozen:,} objects frozen at startup and {tracked:,} still GC-tracked",
        f"{full * 1000:.0f} ms",
        str(len(pauses[2])),
        f"{max(every, default=0.0) * 1000:.1f} ms",
        f"{len(every)} times for {sum(every) * 1000:.0f} ms",
    ]


async def _cpu_per_hit(app: Any, payload: bytes, token: str, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        await asgi_post(app, "/rag/stream", payload, token)
    return (time.process_time() - started) / n


async def profile_in_process(stack: Stack, n: int) -> str:
    """CPU per hit of each app without HTTP, and where it goes (cProfile, CPU-time clock)."""
    from bench.common import make_settings
    from service.http.app import create_app

    settings = make_settings(stack.postgres.url, stack.valkey.url, stack.data_dir)
    apps = {"project": create_app(settings, embedder=stack.embedder), "floor": floor_app(stack.valkey.url, FLOOR_KEY)}
    payload = json.dumps({"question": QUESTION}).encode()
    cpu: dict[str, float] = {}
    profiles: dict[str, pstats.Stats] = {}
    say(f"profiling in-process: {n} hits per app, twice unprofiled (alternating), once under cProfile")
    async with (
        apps["project"].router.lifespan_context(apps["project"]),
        apps["floor"].router.lifespan_context(apps["floor"]),
    ):
        for name, app in apps.items():
            for _ in range(200):  # warm-up, and a check that both really answer hits
                status, body = await asgi_post(app, "/rag/stream", payload, stack.token)
                if status != 200 or not is_hit(body):
                    raise SystemExit(f"in-process {name}: not a hit: {status} {body[:200]!r}")
        for _ in range(2):
            for name, app in apps.items():
                per = await _cpu_per_hit(app, payload, stack.token, n)
                cpu[name] = min(cpu.get(name, per), per)
        for name, app in apps.items():
            profiler = cProfile.Profile(time.process_time)  # CPU time: robust to a busy machine
            profiler.enable()
            for _ in range(n):
                await asgi_post(app, "/rag/stream", payload, stack.token)
            profiler.disable()
            profiles[name] = pstats.Stats(profiler)
        gc_cells = await gc_pauses(apps["project"], payload, stack.token)
    out_dir = RESULTS / "hit_path"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, stats in profiles.items():
        stats.dump_stats(str(out_dir / f"{name}_hit.prof"))
    text = io.StringIO()
    pstats.Stats(str(out_dir / "project_hit.prof"), stream=text).sort_stats("cumulative").print_stats(40)
    say(text.getvalue())

    sides = ("project", "floor")
    # Profiled times are inflated by the profiler; scale each app's numbers by its own
    # unprofiled/profiled ratio (approximate: overstates call-heavy code a little).
    scale = {side: cpu[side] / profiles[side].total_tt for side in sides}  # type: ignore[attr-defined]
    by_package = {side: self_time_by_package(profiles[side]) for side in sides}
    labels = [label for label, _ in PACKAGES] + [OTHER]
    package_rows = [
        [label, *(f"{by_package[side].get(label, 0.0) * scale[side] * 1e6:,.0f}" for side in sides)]
        for label in labels
        if any(by_package[side].get(label, 0.0) * scale[side] >= 0.5e-6 for side in sides)
    ]
    package_rows.append(["**total CPU per hit (unprofiled)**", *(f"**{cpu[side] * 1e6:,.0f}**" for side in sides)])
    step_rows = []
    for label, suffix, name in STEPS:
        value = _cumulative(profiles["project"], suffix, name)
        step_rows.append([label, "–" if value is None else f"{value * scale['project'] * 1e6:,.0f}"])
    return "\n".join(
        [
            f"Where the time goes: both apps in-process, driven straight through ASGI (no sockets, no uvicorn), "
            f"{n} sequential hits each. CPU µs per hit: process CPU clock, best of 2 alternating passes "
            f"(project {cpu['project'] / cpu['floor']:.1f}× the floor); the breakdowns are cProfile CPU time "
            f"scaled to those totals (approximate). Profiles: `bench/results/hit_path/{{project,floor}}_hit.prof`.",
            "",
            markdown_table(["self time by package", "project µs/hit", "floor µs/hit"], package_rows, "lrr"),
            "",
            markdown_table(["project hit-path step (cumulative)", "µs/hit"], step_rows, "lr"),
            "",
            f"Garbage collection: this process holds the loaded embedding model, like the project's server "
            f"process (the floor's server has no model): {gc_cells[0]}; one full collection "
            f"takes {gc_cells[1]}; during {GC_HITS:,} project hits at concurrency {GC_CONCURRENCY} the collector "
            f"ran {gc_cells[4]} in all, with {gc_cells[2]} full (gen2) collections; the longest collection "
            f"paused everything for {gc_cells[3]}.",
        ]
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.hit_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per level, order alternating (default 3)")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per side per round")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each measurement")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw")
    parser.add_argument(
        "--no-profile", dest="profile", action="store_false", help="skip the in-process profile of both apps"
    )
    parser.add_argument("--profile-requests", type=int, default=2000)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or min(args.concurrency) < 1:
        parser.error("--rounds, --duration and --concurrency must be positive")
    return args


async def bench(args: argparse.Namespace, command: str) -> str:
    loads_before = load_text()
    stack = await setup(args)
    try:
        payload = json.dumps({"question": QUESTION}).encode()
        runs: list[Run] = []
        for c in args.concurrency:
            for rnd in range(1, args.rounds + 1):
                order = (stack.project, stack.floor) if rnd % 2 else (stack.floor, stack.project)
                for server in order:
                    run = await measure(server, args.client, payload, stack.token, c, rnd, args.duration, args.warmup)
                    runs.append(run)
                    say(
                        f"c={c:<3} round {rnd} {server.name:8} {run.rps:8,.0f} req/s  "
                        f"p50 {ms(percentile(run.latencies, 50))} "
                        f"p99 {ms(percentile(run.latencies, 99))} ms  errors {run.errors}  "
                        f"client CPU {run.client_cpu / run.seconds:.0%}  server CPU {run.server_cpu / run.seconds:.0%}"
                    )
        profile = await profile_in_process(stack, args.profile_requests) if args.profile else ""
        return render(runs, args, command, len(stack.hit_body), (loads_before, load_text()), profile)
    finally:
        teardown(stack)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "-m", "bench.hit_path", *argv])
    say(f"{nproc()} CPUs, load average {load_text()}")
    import uvloop

    publish(SECTION, uvloop.run(bench(args, command)), no_write=args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
