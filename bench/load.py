"""Load: hundreds of concurrent SSE answer streams on one `rag-serve` worker, then 1 vs 2 workers.

    python -m bench.load [--streams 300] [--rounds 2] [--workers 1 2] [--hit-seconds 15]
                         [--hit-concurrency 32] [--first-token-delay 0.5] [--token-interval 0.025]
                         [--answer-tokens 150] [--limit-corpus N] [--no-write]

Setup: the embedded Postgres (msmarco-5k, shared with `bench.workload` / `bench.stampede`) and
Valkey under `bench/results/replay/` (this benchmark's own logical Redis db); the loopback
`ProviderServer` (tests/provider_server.py) as the Anthropic API, in a process of its own, with a
realistic pace (first token after `--first-token-delay`, then `--answer-tokens` tokens
`--token-interval` apart); `rag-serve --workers N` as a real OS process with an API key of its own.

Per round and worker count (the order alternates between rounds), on a fresh `rag-serve` and a
flushed cache:

1. **Miss burst**: `--streams` `/rag/stream` requests with distinct questions (built from msmarco
   passages, so every one is a miss and a real generation; nothing coalesces), all started at once,
   each on its own connection. Reported: complete (`done` event) vs failed, client-measured TTFT
   (request sent → first `token` event) p50/p95/p99, the burst's duration and requests/s, the RSS
   of the server's process tree (VmRSS of `rag-serve` and every descendant) before, at peak and
   after, and the latency of `GET /health` sent every 100 ms by a separate probe process over a
   keep-alive connection (the event-loop lag proxy: a blocked or saturated loop answers late).
   The load client's own loop lag is measured too (its timer drift), since it inflates client TTFT.
2. **Prime**: the same questions once more, 16 at a time: how many were cached by the burst
   (outcome `hit`); the rest are cached now.
3. **Hit load**: `--hit-concurrency` closed-loop clients on keep-alive connections asking those
   questions round-robin for `--hit-seconds` (after 2 s of warm-up): requests/s of cached answers.

The raw HTTP/1.1 client here (asyncio streams, no httpx) is deliberately cheap, so one client
process can drive hundreds of streams on a 2-core machine without becoming the bottleneck first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import re
import socket
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from bench._serve import (
    MSMARCO,
    ProviderProcess,
    busy_processes,
    fmt_ms,
    now_stamp,
    rag_serve,
    replay_arguments,
    replay_stack,
)
from bench.common import RESULTS, load_average, machine_line, markdown_table, nproc, percentile, publish, revision, say

SECTION = "Load"
REDIS_DB = 8  # bench.workload uses 1-3, bench.stampede 4-6
QUESTION_PREFIX = "what do the sources say about"

# --------------------------------------------------------------------------- a cheap HTTP/1.1 client


@dataclass
class Result:
    """One request as the client saw it; times in seconds from just before it was sent."""

    status: int = 0
    outcome: str = ""  # meta.cache | "error:<code>" (SSE error event) | "http:<status>:<code>" | "client:<exc>"
    started: float = 0.0  # time.monotonic() when sent
    ttft_s: float = math.nan  # first `token` event
    total_s: float = math.nan  # end of the response
    tokens: int = 0
    complete: bool = False  # a `done` event arrived
    retry_after: str | None = None
    server_ttft_ms: float = math.nan
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.complete


class Target:
    """A rag-serve URL and API key, with the request bytes prepared once."""

    def __init__(self, url: str, token: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = int(parts.port or 80)
        self.token = token

    def post(self, path: str, body: dict[str, Any], *, keep_alive: bool) -> bytes:
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"accept: text/event-stream\r\nauthorization: Bearer {self.token}\r\n"
            f"content-length: {len(payload)}\r\nconnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        return head.encode() + payload


async def read_response(reader: asyncio.StreamReader, result: Result) -> tuple[dict[str, str], bytes]:
    """Read one response (Content-Length or chunked); stamps `result.ttft_s` at the first token event."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    result.status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
        if b"event: token" in body:
            result.ttft_s = time.monotonic() - result.started
        return headers, body
    if "chunked" not in headers.get("transfer-encoding", "").lower():
        return headers, await reader.read()  # until the server closes
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers
            return headers, b"".join(parts)
        chunk = (await reader.readexactly(size + 2))[:-2]
        if math.isnan(result.ttft_s) and b"event: token" in chunk:
            result.ttft_s = time.monotonic() - result.started
        parts.append(chunk)


def parse_body(result: Result, headers: dict[str, str], body: bytes) -> None:
    """Outcome, completeness and server TTFT from an SSE (or JSON error) body; token events are only counted."""
    result.retry_after = headers.get("retry-after")
    if result.status != 200:
        code = "?"
        with contextlib.suppress(ValueError, KeyError, TypeError):
            code = str(json.loads(body)["error"]["code"])
        result.outcome = f"http:{result.status}:{code}"
        result.error = body[:200].decode(errors="replace")
        return
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = b"", b""
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip()
            elif line.startswith(b"data:"):
                data = line[5:].strip()
        if name == b"token":
            result.tokens += 1
        elif name == b"meta":
            result.outcome = str(json.loads(data)["cache"])
        elif name == b"done":
            result.complete = True
            ttft = json.loads(data).get("ttft_ms")
            result.server_ttft_ms = float(ttft) if ttft is not None else math.nan
        elif name == b"error":
            result.outcome = f"error:{json.loads(data).get('code')}"
            result.error = data[:200].decode(errors="replace")
    if not result.outcome:
        result.outcome = "client:empty"


async def ask(target: Target, body: dict[str, Any], *, limit_s: float = 120) -> Result:
    """POST /rag/stream on a new connection (closed after the response)."""
    result = Result(started=time.monotonic())
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection(target.host, target.port, limit=1 << 20)
            writer.write(target.post("/rag/stream", body, keep_alive=False))
            headers, raw = await read_response(reader, result)
        parse_body(result, headers, raw)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        result.outcome = f"client:{type(exc).__name__}"
        result.error = str(exc)[:200]
    finally:
        if writer is not None:
            writer.close()
    result.total_s = time.monotonic() - result.started
    return result


class KeepAlive:
    """One persistent connection for sequential requests (re-opened after any failure)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def ask(self, body: dict[str, Any], *, limit_s: float = 60) -> Result:
        result = Result(started=time.monotonic())
        try:
            async with asyncio.timeout(limit_s):
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(
                        self.target.host, self.target.port, limit=1 << 20
                    )
                assert self.reader is not None
                self.writer.write(self.target.post("/rag/stream", body, keep_alive=True))
                headers, raw = await read_response(self.reader, result)
            parse_body(result, headers, raw)
            if headers.get("connection", "").lower() == "close":
                self.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            result.outcome = f"client:{type(exc).__name__}"
            result.error = str(exc)[:200]
            self.close()
        result.total_s = time.monotonic() - result.started
        return result

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# --------------------------------------------------------------------------- questions


def passage_questions(n: int, *, prefix: str = QUESTION_PREFIX, skip: int = 0) -> list[str]:
    """`n` distinct questions, one per msmarco passage (every 7th, starting at `skip`), in a fixed order."""
    # Bytes and b"\n" only: passages contain characters str.splitlines() would also split on.
    rows = [json.loads(line) for line in (MSMARCO / "corpus.jsonl").read_bytes().split(b"\n") if line.strip()]
    out: list[str] = []
    seen: set[str] = set()
    order = [rows[(skip + i * 7) % len(rows)] for i in range(len(rows))]
    for row in order:
        words = re.findall(r"[a-z][a-z']+", str(row["text"]).lower())[:7]
        question = f"{prefix} {' '.join(words)}"
        if len(words) >= 5 and question not in seen:
            seen.add(question)
            out.append(question)
            if len(out) == n:
                return out
    raise SystemExit(f"only {len(out)} distinct questions could be built, {n} needed")


# --------------------------------------------------------------------------- process tree memory


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _ppid(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tree_rss(root: int) -> dict[int, int]:
    """VmRSS (KiB) of `root` and every descendant."""
    return {pid: rss_kb(pid) for pid in process_tree(root)}


class RssSampler:
    """Samples the server tree's total RSS every `interval` s; keeps the peak."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root = root
        self.interval = interval
        self.peak_kb = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, sum((await asyncio.to_thread(tree_rss, self.root)).values()))
            await asyncio.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def wait_for_workers(root: int, workers: int, *, min_kb: int = 250_000, within: float = 180) -> None:
    """Until `workers` processes of the tree hold the model (RSS ≥ `min_kb`) and the total stopped growing."""
    deadline = time.monotonic() + within
    last = 0
    while time.monotonic() < deadline:
        rss = tree_rss(root)
        total = sum(rss.values())
        if sum(1 for v in rss.values() if v >= min_kb) >= workers and abs(total - last) < 0.01 * total:
            return
        last = total
        await asyncio.sleep(1)
    say(f"warning: {workers} loaded workers not seen within {within:.0f} s ({tree_rss(root)})")


# --------------------------------------------------------------------------- event-loop lag probes


def _probe_main(host: str, port: int, interval: float, control: Any) -> None:
    """In a process of its own: GET /health every `interval` s on a keep-alive connection until told to stop.

    Sends back [(time.monotonic() when sent, latency s or NaN, error)].
    """
    samples: list[tuple[float, float, str]] = []
    sock: socket.socket | None = None
    request = f"GET /health HTTP/1.1\r\nhost: {host}:{port}\r\n\r\n".encode()
    next_at = time.monotonic()
    while not control.poll(0):
        sent = time.monotonic()
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=30)
            sock.sendall(request)
            buf = b""
            while b"\r\n\r\n" not in buf:
                more = sock.recv(4096)
                if not more:
                    raise ConnectionError("closed")
                buf += more
            head, _, body = buf.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head)[1])  # type: ignore[index]
            while len(body) < length:
                more = sock.recv(4096)
                if not more:
                    raise ConnectionError("closed")
                body += more
            samples.append((sent, time.monotonic() - sent, ""))
        except (OSError, TypeError) as exc:
            samples.append((sent, math.nan, type(exc).__name__))
            if sock is not None:
                sock.close()
            sock = None
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at = max(next_at, time.monotonic() - interval)  # after a slow reply, do not fire a burst
    if sock is not None:
        sock.close()
    control.send(samples)


class HealthProbe:
    """`GET /health` every `interval` s from a separate process (so the load client's loop cannot delay it)."""

    def __init__(self, target: Target, interval: float = 0.1) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._mine, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=_probe_main, args=(target.host, target.port, interval, theirs), daemon=True)

    def start(self) -> None:
        self._proc.start()

    async def stop(self) -> list[tuple[float, float, str]]:
        self._mine.send("stop")
        samples: list[tuple[float, float, str]] = await asyncio.to_thread(self._mine.recv)
        await asyncio.to_thread(self._proc.join, 10)
        return samples


class LoopLag:
    """This process's own event-loop lag: how late a 50 ms timer fires."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.interval)
            self.lags.append(time.monotonic() - before - self.interval)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


# --------------------------------------------------------------------------- one run


async def warm_up(target: Target, workers: int) -> None:
    """A few bypass requests per worker (first encode, first provider connection)."""
    for _ in range(2):
        replies = await asyncio.gather(
            *(
                ask(target, {"question": f"how do vaccines train the immune system {i}", "cache": "bypass"})
                for i in range(2 * workers)
            )
        )
        bad = [r for r in replies if not r.ok]
        if bad:
            raise SystemExit(f"warm-up failed: {bad[0].outcome} {bad[0].error}")


async def answers_cached(redis_url: str) -> int:
    client = aioredis.from_url(redis_url)
    try:
        return sum([1 async for _ in client.scan_iter(match="ragcache:answer:*", count=1000)])
    finally:
        await client.aclose()


async def flush_redis(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


def warnings_in(log: Path) -> dict[str, int]:
    """WARNING/ERROR lines of the server log (JSON lines or plain text), by message with digits collapsed."""
    counts: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            record: Any = None
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
            if isinstance(record, dict):
                level = str(record.get("level", "")).upper()
                if level in ("WARNING", "ERROR", "CRITICAL"):
                    message = re.sub(r"[0-9]+", "N", str(record.get("event", "")))[:100]
                    counts[f"{level} {record.get('logger', '?')}: {message}"] += 1
            elif match := re.search(r" (WARNING|ERROR|CRITICAL) (\S+): (.*)", line):
                counts[f"{match[1]} {match[2]}: {re.sub(r'[0-9]+', 'N', match[3])[:100]}"] += 1
            elif "Traceback" in line or line.startswith("ERROR"):
                counts[line[:100]] += 1
    return dict(counts.most_common(8))


def stats(values: Sequence[float]) -> dict[str, float]:
    clean = [v for v in values if not math.isnan(v)]
    return {
        "p50": percentile(clean, 50),
        "p95": percentile(clean, 95),
        "p99": percentile(clean, 99),
        "max": max(clean, default=math.nan),
        "n": len(clean),
    }


def peak_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The largest number of intervals open at one instant."""
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    peak = now = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


async def miss_burst(target: Target, server_pid: int, questions: list[str]) -> dict[str, Any]:
    probe = HealthProbe(target)
    probe.start()
    await asyncio.sleep(3)  # idle baseline of the probe
    rss_before = tree_rss(server_pid)
    load_before = load_average()
    busy = busy_processes()
    with RssSampler(server_pid) as sampler, LoopLag() as lag:
        started = time.monotonic()
        results = await asyncio.gather(*(ask(target, {"question": q}) for q in questions))
        ended = time.monotonic()
    await asyncio.sleep(2)
    rss_after = tree_rss(server_pid)
    samples = await probe.stop()
    idle = [lat for at, lat, _ in samples if at < started - 0.2]
    during = [lat for at, lat, _ in samples if started <= at <= ended]
    probe_errors = Counter(err for at, _, err in samples if err and started <= at <= ended)
    ok = [r for r in results if r.ok]
    return {
        "requests": len(results),
        "complete": len(ok),
        "failed": len(results) - len(ok),
        "outcomes": dict(Counter(r.outcome for r in results)),
        "failures": [f"{r.outcome}: {r.error}" for r in results if not r.ok][:10],
        "tokens_p50": statistics.median([r.tokens for r in ok]) if ok else 0,
        "ttft": stats([r.ttft_s for r in ok]),
        "server_ttft_ms": stats([r.server_ttft_ms for r in ok]),
        "total": stats([r.total_s for r in ok]),
        "duration_s": ended - started,
        "rps": len(ok) / (ended - started),
        "dispatch_spread_s": max(r.started for r in results) - min(r.started for r in results),
        # streams between their first token and their end at one instant (all are open from the start)
        "peak_generating": peak_overlap([(r.started + r.ttft_s, r.started + r.total_s) for r in ok]),
        "stream_after_first_token": stats([r.total_s - r.ttft_s for r in ok]),
        "rss_before_kb": sum(rss_before.values()),
        "rss_peak_kb": max(sampler.peak_kb, sum(rss_before.values()), sum(rss_after.values())),
        "rss_after_kb": sum(rss_after.values()),
        "rss_processes_before": {str(k): v for k, v in rss_before.items()},
        "rss_processes_after": {str(k): v for k, v in rss_after.items()},
        "health_idle": stats(idle),
        "health": stats(during),
        "health_errors": dict(probe_errors),
        "client_lag": stats(lag.lags),
        "load_before": load_before,
        "load_after": load_average(),
        "busy_processes": busy,
        "results": [asdict(r) for r in results],
    }


async def prime(target: Target, questions: list[str], concurrency: int = 16) -> dict[str, int]:
    """Ask every question once more (bounded concurrency); outcome counts show what the burst cached."""
    sem = asyncio.Semaphore(concurrency)

    async def one(question: str) -> Result:
        async with sem:
            return await ask(target, {"question": question})

    results = await asyncio.gather(*(one(q) for q in questions))
    return dict(Counter(r.outcome for r in results))


async def hit_load(target: Target, questions: list[str], concurrency: int, seconds: float) -> dict[str, Any]:
    """Closed loop: `concurrency` keep-alive clients asking cached questions round-robin."""
    warm_until = time.monotonic() + 2
    stop_at = warm_until + seconds
    results: list[Result] = []
    counter = iter(range(10**9))

    async def client() -> None:
        conn = KeepAlive(target)
        try:
            while (now := time.monotonic()) < stop_at:
                result = await conn.ask({"question": questions[next(counter) % len(questions)]})
                if now >= warm_until:
                    results.append(result)
        finally:
            conn.close()

    load_before = load_average()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    ok = [r for r in results if r.ok]
    return {
        "requests": len(results),
        "ok": len(ok),
        "rps": len(ok) / seconds,
        "outcomes": dict(Counter(r.outcome for r in results)),
        "latency": stats([r.total_s for r in ok]),
        "load_before": load_before,
        "load_after": load_average(),
    }


# --------------------------------------------------------------------------- report


def _mb(kb: float) -> str:
    return f"{kb / 1024:,.0f}"


def _ms(seconds: float) -> str:
    return fmt_ms(seconds * 1000)


def _load(values: Sequence[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in values)


def report(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    workers = sorted({r["workers"] for r in runs})
    lines = [
        f"Command (from the repository root): `{meta['command']}` — {meta['date']} — {meta['machine']} — "
        f"revision {meta.get('revision', 'unknown')}. Load average (1/5/15 min) at start "
        f"{_load(meta['load_start'])}, at end {_load(meta['load_end'])}.",
        "",
        f"Setup: msmarco-5k ({meta['documents']:,} passages) in embedded Postgres 18 + pgvector, embedded Valkey "
        "(a logical db of its own, flushed before each run); `rag-serve --workers N` as its own process (a fresh "
        "one per run), with a real API key. Model: the loopback `ProviderServer` in a process of its own behind "
        f"the real Anthropic SDK, first token after {meta['first_token_delay'] * 1000:.0f} ms, then "
        f"{meta['answer_tokens']} tokens {meta['token_interval'] * 1000:.0f} ms apart "
        f"({1 / meta['token_interval']:.0f} tokens/s; an unloaded stream lasts "
        f"{meta['first_token_delay'] + (meta['answer_tokens'] - 1) * meta['token_interval']:.1f} s). "
        f"Load client: one asyncio process with a minimal HTTP/1.1 client (no httpx), on the same machine.",
        "",
        f"**Miss burst**: {meta['streams']} `/rag/stream` requests with {meta['streams']} distinct questions "
        f"(“{QUESTION_PREFIX} …” + the first words of a msmarco passage; `cache: use`, so each one is a miss "
        "that leads its own generation, publishes its tokens for would-be followers and writes the cache) "
        "started at once, each on a new connection. TTFT = request sent → first `token` event, at the "
        "client; server TTFT = `done.ttft_ms` (from the start of the pipeline). All streams are open from the "
        "start; “generating at once” = the peak number between their first token and their end. "
        "RSS = VmRSS summed over `rag-serve` and all its descendants (/proc), before the burst "
        "(after warm-up), peak (sampled every 0.5 s) and 2 s after it. **Loop-lag proxy**: a separate "
        "probe process sends `GET /health` every 100 ms over a keep-alive connection and times the reply "
        "(idle = the 3 s before the burst); the server was not instrumented. Client lag = how late the load "
        "client's own 50 ms timer fired (it inflates client TTFT).",
        "",
    ]
    header = [
        "workers",
        "round",
        "complete / failed",
        "TTFT p50 / p95 / p99",
        "server TTFT p50 / p99",
        "first token → end p50 / max",
        "generating at once",
        "burst duration",
        "req/s",
        "RSS before / peak / after (MB)",
        "/health idle p50 → during p50 / p95 / max",
        "client lag p95 / max",
    ]
    rows = []
    for r in runs:
        b = r["burst"]
        rows.append(
            [
                str(r["workers"]),
                str(r["round"]),
                f"**{b['complete']}** / {b['failed']}",
                f"{_ms(b['ttft']['p50'])} / {_ms(b['ttft']['p95'])} / **{_ms(b['ttft']['p99'])}** ms",
                f"{fmt_ms(b['server_ttft_ms']['p50'])} / {fmt_ms(b['server_ttft_ms']['p99'])} ms",
                f"{b['stream_after_first_token']['p50']:.1f} / {b['stream_after_first_token']['max']:.1f} s"
                if "stream_after_first_token" in b
                else "–",
                str(b.get("peak_generating", "–")),
                f"{b['duration_s']:.1f} s",
                f"{b['rps']:.1f}",
                f"{_mb(b['rss_before_kb'])} / {_mb(b['rss_peak_kb'])} / {_mb(b['rss_after_kb'])}",
                f"{_ms(b['health_idle']['p50'])} → {_ms(b['health']['p50'])} / {_ms(b['health']['p95'])} / "
                f"{_ms(b['health']['max'])} ms",
                f"{_ms(b['client_lag']['p95'])} / {_ms(b['client_lag']['max'])} ms",
            ]
        )
    lines += [markdown_table(header, rows), ""]
    first = [r["provider_first_token"]["p50"] for r in runs]
    dur = [r["provider_duration"]["p50"] for r in runs]
    lines += [
        f"The provider stand-in saw {sum(r['provider_calls'] for r in runs):,} generation calls; per run, its "
        f"first token went out after {_ms(min(first))}–{_ms(max(first))} ms (p50) and its stream lasted "
        f"{min(dur):.1f}–{max(dur):.1f} s (p50), so the time before the first token is spent in `rag-serve` "
        "before it calls the model (guardrails, cache look-ups, embedding, retrieval).",
        "",
    ]

    hit_rows = []
    for r in runs:
        h = r["hits"]
        others = {k: v for k, v in h["outcomes"].items() if k != "hit"}
        hit_rows.append(
            [
                str(r["workers"]),
                str(r["round"]),
                f"{r['primed'].get('hit', 0)} / {meta['streams']}",
                f"{h['ok']:,}",
                f"**{h['rps']:.0f}**",
                f"{_ms(h['latency']['p50'])} / {_ms(h['latency']['p99'])} ms",
                ", ".join(f"{k} {v}" for k, v in others.items()) or "–",
                f"{_load(r['burst']['load_before'])}",
                ", ".join(r["burst"]["busy_processes"]) or "–",
            ]
        )
    lines += [
        f"**Hit load** (after the burst, on the same server): {meta['hit_concurrency']} closed-loop clients on "
        f"keep-alive connections asking the burst's questions round-robin for {meta['hit_seconds']:.0f} s (after "
        "2 s of warm-up). “cached by the burst” = how many of the burst's answers a second pass found in the "
        "cache (the rest were generated and cached by that pass).",
        "",
        markdown_table(
            [
                "workers",
                "round",
                "cached by the burst",
                "hits served",
                "hits/s",
                "latency p50 / p99",
                "non-hit outcomes",
                "load before burst (1/5/15)",
                "busy at burst start",
            ],
            hit_rows,
            "lrrrrrrrl",
        ),
        "",
    ]

    def med(w: int, pick: Any) -> float:
        values = [pick(r) for r in runs if r["workers"] == w]
        return statistics.median(values) if values else math.nan

    if len(workers) >= 2:
        lo, hi = workers[0], workers[-1]
        miss_lo, miss_hi = med(lo, lambda r: r["burst"]["rps"]), med(hi, lambda r: r["burst"]["rps"])
        hit_lo, hit_hi = med(lo, lambda r: r["hits"]["rps"]), med(hi, lambda r: r["hits"]["rps"])
        p99_lo, p99_hi = med(lo, lambda r: r["burst"]["ttft"]["p99"]), med(hi, lambda r: r["burst"]["ttft"]["p99"])
        lines += [
            f"**{hi} workers vs {lo}** (medians over rounds): miss burst {miss_lo:.1f} → {miss_hi:.1f} req/s "
            f"(**×{miss_hi / miss_lo:.2f}**), TTFT p99 {_ms(p99_lo)} → {_ms(p99_hi)} ms; hit load "
            f"{hit_lo:.0f} → {hit_hi:.0f} req/s (**×{hit_hi / hit_lo:.2f}**). The machine has "
            f"{meta['nproc']} cores, shared by the server's workers, Postgres, Valkey, the provider process and "
            "the load client (and by whatever else ran: see the load averages).",
            "",
        ]
    failures = [f"{r['workers']} workers round {r['round']}: {f}" for r in runs for f in r["burst"]["failures"]]
    lines += [f"Failed streams: {'; '.join(failures[:10]) if failures else 'none'}.", ""]
    warns = [
        f"{r['workers']}w r{r['round']}: " + "; ".join(f"{k} ×{v}" for k, v in r["warnings"].items())
        for r in runs
        if r["warnings"]
    ]
    lines += [f"Server log warnings: {' | '.join(warns) if warns else 'none'}.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def metrics_env(path: Path) -> dict[str, str]:
    """prometheus-client's multiprocess directory for `--workers N`: one per run, not the shared data dir's."""
    path.mkdir(parents=True, exist_ok=True)
    return {"PROMETHEUS_MULTIPROC_DIR": str(path)}


async def one_run(
    args: argparse.Namespace,
    *,
    dsn: str,
    redis_url: str,
    provider: ProviderProcess,
    token: str,
    workers: int,
    rnd: int,
    questions: list[str],
    run_dir: Path,
) -> dict[str, Any]:
    await flush_redis(redis_url)
    await provider.reset()
    log = run_dir / f"rag-serve-w{workers}-r{rnd}.log"
    env = metrics_env(run_dir / f"prom-w{workers}-r{rnd}") if workers > 1 else {}
    async with rag_serve(
        dsn=dsn, redis_url=redis_url, provider_url=provider.base_url, log=log, env=env, workers=workers
    ) as server:
        await wait_for_workers(server.pid, workers)
        target = Target(server.url, token)
        await warm_up(target, workers)
        await provider.reset()
        say(f"== round {rnd}, {workers} worker(s): {len(questions)} concurrent streams")
        burst = await miss_burst(target, server.pid, questions)
        calls = await provider.calls()
        cached = await answers_cached(redis_url)
        say(
            f"   complete {burst['complete']}/{burst['requests']}, TTFT p50/p95/p99 {_ms(burst['ttft']['p50'])}/"
            f"{_ms(burst['ttft']['p95'])}/{_ms(burst['ttft']['p99'])} ms, {burst['duration_s']:.1f} s, "
            f"RSS {_mb(burst['rss_before_kb'])}→{_mb(burst['rss_peak_kb'])}→{_mb(burst['rss_after_kb'])} MB, "
            f"/health p50/max {_ms(burst['health']['p50'])}/{_ms(burst['health']['max'])} ms, "
            f"{len(calls)} provider calls, {cached} answers cached; outcomes {burst['outcomes']}"
        )
        primed = await prime(target, questions)
        say(f"   prime pass: {primed}")
        hits = await hit_load(target, questions, args.hit_concurrency, args.hit_seconds)
        say(
            f"   hit load: {hits['rps']:.0f} req/s, p50/p99 {_ms(hits['latency']['p50'])}/"
            f"{_ms(hits['latency']['p99'])} ms, outcomes {hits['outcomes']}"
        )
    provider_first = [c["first_token_s"] for c in calls if c["first_token_s"] is not None]
    provider_dur = [c["duration_s"] for c in calls if c["duration_s"] is not None]
    return {
        "workers": workers,
        "round": rnd,
        "burst": burst,
        "provider_calls": len(calls),
        "provider_first_token": stats(provider_first),
        "provider_duration": stats(provider_dur),
        "answers_cached_after_burst": cached,
        "primed": primed,
        "hits": hits,
        "warnings": warnings_in(log),
    }


async def main_async(args: argparse.Namespace) -> None:
    run_dir = RESULTS / "load" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    plan = [(rnd, w) for rnd in range(1, args.rounds + 1) for w in (args.workers if rnd % 2 else args.workers[::-1])]
    all_questions = passage_questions(args.streams * len(plan))
    runs: list[dict[str, Any]] = []
    async with replay_stack(args, "bench-load") as stack:
        redis_url = stack.servers.redis_url(REDIS_DB)
        try:
            for i, (rnd, workers) in enumerate(plan):
                questions = all_questions[i * args.streams : (i + 1) * args.streams]
                runs.append(
                    await one_run(
                        args,
                        dsn=stack.dsn,
                        redis_url=redis_url,
                        provider=stack.provider,
                        token=stack.token,
                        workers=workers,
                        rnd=rnd,
                        questions=questions,
                        run_dir=run_dir,
                    )
                )
                (run_dir / "summary.json").write_text(json.dumps({"runs": runs}, default=str))
        finally:
            await forget_semantic_rows(stack.dsn)
    meta = {
        "command": "python -m bench.load" + (" " + " ".join(args.argv) if args.argv else ""),
        "date": now_stamp(),
        "machine": machine_line(),
        "revision": revision(),
        "nproc": nproc(),
        "documents": stack.documents,
        "streams": args.streams,
        "first_token_delay": args.first_token_delay,
        "token_interval": args.token_interval,
        "answer_tokens": args.answer_tokens,
        "hit_concurrency": args.hit_concurrency,
        "hit_seconds": args.hit_seconds,
        "load_start": load_start,
        "load_end": load_average(),
    }
    (run_dir / "summary.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1, default=str))
    publish(SECTION, report(runs, meta), no_write=args.no_write, run_dir=run_dir)


async def forget_semantic_rows(dsn: str) -> None:
    """The burst's questions went into the shared corpus database's semantic index: take them out again."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM semantic_cache WHERE question LIKE $1", f"{QUESTION_PREFIX} %")
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hit-seconds", type=float, default=15)
    parser.add_argument("--hit-concurrency", type=int, default=32)
    replay_arguments(parser, first_token_delay=0.5, token_interval=0.025)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        publish(SECTION, report(saved["runs"], saved["meta"]), no_write=args.no_write)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
