"""Shared plumbing for the replay benchmarks (`bench.workload`, `bench.stampede`, `bench.load`,
`bench.fault_timeline`): servers, corpus, rag-serve, the model stand-in, SSE client, options.

- one embedded Postgres + Valkey under `bench/results/replay/` (gitignored), kept between runs so
  the MS MARCO corpus is ingested once per corpus size (a database per size: `msmarco_full`,
  `msmarco_<N>`);
- `rag-serve` as real OS processes pointed at the loopback `ProviderServer` (tests/provider_server.py)
  through `ANTHROPIC_BASE_URL`, each on its own port;
- a streaming client that measures time to the first `token` event itself and keeps every
  field of `meta` and `done`;
- `replay_arguments` / `replay_stack`: the options and the set-up (servers, model stand-in,
  corpus, API key) that these benchmarks share.

Machine description, API keys and writing docs/benchmarks.md (`publish`) come from `bench.common`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from bench.common import (
    RESULTS,
    ROOT,
    SHARED_DATA,
    bearer,
    clean_env,
    create_key,
    free_port,
    say,
    sse_events,
    with_database,
)

DATA_DIR = RESULTS / "replay"
MSMARCO = SHARED_DATA / "msmarco-5k"
PARAPHRASES = ROOT / "bench" / "paraphrases.jsonl"
BIN = Path(sys.executable).parent
# First-request costs (SDK client, pool, query plans) are paid on these, outside any measurement.
WARM_UP = ["what is the boiling point of water at altitude", "how do vaccines train the immune system"]


# --------------------------------------------------------------------------- statistics, machine


def fmt_ms(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def now_stamp() -> str:
    return dt.datetime.now().strftime("%Y-%m-%d %H:%M")


def busy_processes(limit: int = 5) -> list[str]:
    """The busiest other processes right now (what else loads the machine), as `name cpu%`."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.splitlines():
        pid, cpu, comm = line.split(None, 2)
        if int(pid) != os.getpid() and float(cpu) >= 5.0:
            rows.append(f"{comm.strip()} {float(cpu):.0f}%")
    return rows[:limit]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Query:
    query_id: str
    text: str
    paraphrases: tuple[str, ...]


def load_queries(root: Path = MSMARCO, paraphrases: Path = PARAPHRASES) -> list[Query]:
    extra: dict[str, list[str]] = {}
    for line in paraphrases.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            extra.setdefault(str(row["query_id"]), []).append(str(row["text"]))
    queries = []
    for line in (root / "queries.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            qid = str(row["_id"])
            queries.append(Query(qid, str(row["text"]), tuple(extra.pop(qid, []))))
    if extra:
        raise SystemExit(f"{paraphrases}: unknown query ids {sorted(extra)}")
    return queries


# --------------------------------------------------------------------------- servers and corpus


@dataclass
class Servers:
    admin_dsn: str
    redis_base: str

    def redis_url(self, db: int) -> str:
        return f"{self.redis_base}{'&' if '?' in self.redis_base else '?'}db={db}"

    def database(self, name: str) -> str:
        return with_database(self.admin_dsn, name)


@contextlib.contextmanager
def embedded_servers(data_dir: Path = DATA_DIR) -> Iterator[Servers]:
    """Embedded Postgres + Valkey under `data_dir` (started, or attached to if already running)."""
    from service.embedded import start_postgres, start_valkey

    pg = start_postgres(data_dir)
    valkey = start_valkey(data_dir)
    try:
        yield Servers(pg.url, valkey.url)
    finally:
        valkey.stop()
        pg.stop()


async def _documents(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass('documents')") is None:
            return 0
        return int(await conn.fetchval("SELECT count(*) FROM documents"))
    finally:
        await conn.close()


async def ensure_corpus(servers: Servers, limit: int | None, data_dir: Path = DATA_DIR) -> tuple[str, int]:
    """A database holding msmarco-5k (or its first `limit` passages); ingested once, then reused.

    Returns the database URL and the number of documents. Ingest runs the real `rag-ingest add
    --format beir` CLI.
    """
    corpus = MSMARCO / "corpus.jsonl"
    name = "msmarco_full" if limit is None else f"msmarco_{limit}"
    admin = await asyncpg.connect(servers.admin_dsn)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = servers.database(name)
    if limit is not None:
        subset = data_dir / f"corpus-{limit}" / "corpus.jsonl"
        subset.parent.mkdir(parents=True, exist_ok=True)
        # Bytes and b"\n" only: passages contain characters str.splitlines() would also split on.
        head = b"".join(line + b"\n" for line in corpus.read_bytes().split(b"\n")[:limit])
        if not subset.exists() or subset.read_bytes() != head:
            subset.write_bytes(head)
        corpus = subset
    expected = sum(1 for line in corpus.read_bytes().split(b"\n") if line.strip())
    have = await _documents(dsn)
    if have != expected:
        say(f"ingesting {expected} passages from {corpus} into {name} (has {have}); this takes minutes …")
        started = time.perf_counter()
        env = clean_env(DATABASE_URL=dsn, RAG_DATA_DIR=str(data_dir), RAG_LOG_LEVEL="warning")
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "rag-ingest"),
            "add",
            str(corpus),
            "--format",
            "beir",
            "--json",
            env=env,
            cwd=str(data_dir),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"rag-ingest failed ({proc.returncode}): {out.decode()[-2000:]}")
        say(f"ingest done in {time.perf_counter() - started:.0f} s")
        have = await _documents(dsn)
    return dsn, have


async def fresh_caches(dsn: str, redis_url: str) -> None:
    """Empty the answer cache (the whole logical Redis db) and the semantic index."""
    client = aioredis.from_url(redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass('semantic_cache')") is not None:
            await conn.execute("DELETE FROM semantic_cache")
    finally:
        await conn.close()


@dataclass
class RagServe:
    url: str
    pid: int
    log: Path


@asynccontextmanager
async def rag_serve(
    *,
    dsn: str,
    redis_url: str,
    provider_url: str,
    log: Path,
    env: Mapping[str, str] | None = None,
    workers: int = 1,
    data_dir: Path = DATA_DIR,
) -> AsyncIterator[RagServe]:
    """`rag-serve --port P [--workers N]` as its own process, answering through the provider server."""
    port = free_port()
    environment = clean_env(
        DATABASE_URL=dsn,
        REDIS_URL=redis_url,
        RAG_DATA_DIR=str(data_dir),
        ANTHROPIC_API_KEY="sk-ant-bench",
        ANTHROPIC_BASE_URL=provider_url,
        RAG_PROVIDER_MAX_RETRIES="0",
        RAG_LOG_LEVEL="warning",
        **(env or {}),
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        proc = subprocess.Popen(  # noqa: ASYNC220 - starting the server under test is the point
            [str(BIN / "rag-serve"), "--port", str(port), "--workers", str(workers)],
            env=environment,
            cwd=str(data_dir),  # no .env of the work tree leaks in
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        async with httpx.AsyncClient() as http:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"rag-serve exited with {proc.returncode}; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{url}/health", timeout=2)).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"rag-serve did not start within 180 s; see {log}")
                await asyncio.sleep(0.2)
        yield RagServe(url, proc.pid, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


# --------------------------------------------------------------------------- the model stand-in

_FILLER_TEXT = (
    "the passage describes this in some detail and adds context that a reader would want "
    "including the usual conditions exceptions and a short example so that the answer stays "
    "grounded in the retrieved text rather than general knowledge"
)
_FILLER = _FILLER_TEXT.split()


def realistic_answer(tokens: int) -> Any:
    """A Behavior `text` callable: a deterministic answer of exactly `tokens` words that cites [1] and [2].

    Deterministic in the request body, so identical prompts give identical answers.
    """
    from tests.support.provider_server import default_answer

    def answer(body: Mapping[str, Any]) -> str:
        head = default_answer(body).split()
        seed = int(hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()[:8], 16)
        words = list(head)
        i = 0
        while len(words) < tokens - 1:
            words.append(_FILLER[(seed + i * 7) % len(_FILLER)])
            i += 1
            if i % 23 == 0:
                words[-1] += f" [{1 + (seed + i) % 2}]."
        words = [*words[: tokens - 1], "[2]."]
        return " ".join(words)

    return answer


class ProviderProcess:
    """The loopback `ProviderServer` in a process of its own, so the client's load cannot slow its pacing.

    Every generation request gets the same `Behavior` (first-token delay, token interval, an answer of
    `answer_tokens` words); `reset()` forgets recorded calls, `calls()` returns the generation calls so far.
    """

    def __init__(self, first_token_delay: float, token_interval: float, answer_tokens: int) -> None:
        self.args = [str(first_token_delay), str(token_interval), str(answer_tokens)]
        self.base_url = ""
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> ProviderProcess:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench._serve",
            "provider",
            *self.args,
            cwd=str(ROOT),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,  # one JSON line per reply; the default 64 KiB limit is too small for many calls
        )
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 60)
        if not line:
            raise SystemExit("the provider server process did not start")
        self.base_url = json.loads(line)["base_url"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await self._command("quit")
        for _ in range(2):
            try:
                await asyncio.wait_for(self._proc.wait(), 15)
                return
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
        say(f"warning: provider server process {self._proc.pid} did not report its exit")

    async def _command(self, name: str) -> Any:
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        if self._proc.returncode is not None:
            raise RuntimeError(f"the provider server process exited ({self._proc.returncode})")
        self._proc.stdin.write(f"{name}\n".encode())
        await asyncio.wait_for(self._proc.stdin.drain(), 30)
        line = await asyncio.wait_for(self._proc.stdout.readline(), 30)
        if not line:
            raise RuntimeError("the provider server process closed its output")
        return json.loads(line)

    async def reset(self) -> None:
        await self._command("reset")

    async def calls(self) -> list[dict[str, Any]]:
        """Generation calls (Messages / Chat Completions) received since the last reset."""
        result: list[dict[str, Any]] = await self._command("calls")
        return result


def _provider_main(first_token_delay: str, token_interval: str, answer_tokens: str) -> None:
    from tests.support.provider_server import Behavior, ProviderServer

    behavior = Behavior(
        text=realistic_answer(int(answer_tokens)),
        first_token_delay=float(first_token_delay),
        token_interval=float(token_interval),
    )
    with ProviderServer() as server:
        server.default = behavior
        print(json.dumps({"base_url": server.base_url}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "reset":
                server.reset()
                server.default = behavior
                print("{}", flush=True)
            elif command == "calls":
                calls = [
                    {
                        "route": c.route,
                        "text": c.text if i == 0 else None,  # the first answer in full, the rest by digest
                        "text_sha256": hashlib.sha256(c.text.encode()).hexdigest(),
                        "tokens_sent": c.tokens_sent,
                        "completed": c.completed,
                        "first_token_s": None if c.first_token_at is None else c.first_token_at - c.started_at,
                        "duration_s": None if c.finished_at is None else c.finished_at - c.started_at,
                    }
                    for i, c in enumerate(c for c in server.calls if c.route in ("messages", "chat.completions"))
                ]
                print(json.dumps(calls), flush=True)
            else:
                print("{}", flush=True)
                break


# --------------------------------------------------------------------------- the client


@dataclass
class Reply:
    """One /rag/stream request as the client saw it. Times in ms from just before the request was sent."""

    status: int = 0
    outcome: str = ""  # meta.cache, or "error:<code>"
    ttft_ms: float = math.nan  # client: first `token` event
    total_ms: float = math.nan  # client: end of the stream
    server_ttft_ms: float = math.nan  # done.ttft_ms
    server_latency_ms: float = math.nan
    usage: dict[str, Any] = field(default_factory=dict)
    saved: dict[str, Any] = field(default_factory=dict)
    semantic: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    events: list[str] = field(default_factory=list)
    error: str = ""
    started_at: float = 0.0  # time.perf_counter() when sent

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.events) and self.events[-1] == "done"


async def stream(http: httpx.AsyncClient, url: str, body: Mapping[str, Any], limit_s: float = 120) -> Reply:
    """POST /rag/stream; the time of the first `token` event is taken as its bytes arrive, the rest parsed at the end.

    Parsing only up to the first token keeps the client cheap when it reads a hundred streams at once.
    """
    reply = Reply()
    reply.started_at = started = time.perf_counter()
    chunks: list[bytes] = []
    try:
        async with http.stream("POST", f"{url}/rag/stream", json=dict(body), timeout=limit_s) as response:
            reply.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                reply.outcome = "error:http"
                reply.error = f"{response.status_code} {response.text[:300]}"
                return reply
            seen = b""
            async for chunk in response.aiter_raw():
                chunks.append(chunk)
                if math.isnan(reply.ttft_ms):
                    seen = seen[-32:] + chunk
                    if b"event: token" in seen:
                        reply.ttft_ms = (time.perf_counter() - started) * 1000
    except httpx.HTTPError as exc:
        reply.outcome = "error:client"
        reply.error = f"{type(exc).__name__}: {exc}"
    reply.total_ms = (time.perf_counter() - started) * 1000
    pieces: list[str] = []
    for name, data in sse_events(b"".join(chunks)):
        reply.events.append(name)
        if name == "meta":
            reply.outcome = str(data["cache"])
            reply.semantic = dict(data.get("semantic") or {})
        elif name == "token":
            pieces.append(str(data["text"]))
        elif name == "done":
            reply.server_ttft_ms = float(data["ttft_ms"]) if data.get("ttft_ms") is not None else math.nan
            reply.server_latency_ms = float(data["latency_ms"])
            reply.usage = dict(data["usage"])
            reply.saved = dict(data.get("saved") or {})
        elif name == "error":
            reply.outcome = f"error:{data.get('code')}"
            reply.error = str(data.get("message"))
    if reply.error and not reply.outcome.startswith("error"):
        reply.outcome = "error:client"
    reply.text = "".join(pieces)
    return reply


async def warm_up(http: httpx.AsyncClient, url: str) -> None:
    """Pay a server's first-request costs with `cache: bypass` requests, outside any measurement."""
    for question in WARM_UP:
        warm = await stream(http, url, {"question": question, "cache": "bypass"})
        if not warm.ok:
            raise SystemExit(f"warm-up of {url} failed: {warm.outcome} {warm.error}")


# --------------------------------------------------------------------------- what the replay benchmarks share


def replay_arguments(
    parser: argparse.ArgumentParser,
    *,
    first_token_delay: float = 0.6,
    token_interval: float = 0.02,
    answer_tokens: int = 150,
) -> None:
    """The options every replay benchmark has: corpus size, the model stand-in's pace, where results go."""
    parser.add_argument("--limit-corpus", type=int, default=None, help="ingest only the first N passages (quick runs)")
    parser.add_argument("--first-token-delay", type=float, default=first_token_delay, help="seconds")
    parser.add_argument("--token-interval", type=float, default=token_interval, help="seconds")
    parser.add_argument("--answer-tokens", type=int, default=answer_tokens)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--report-from", type=Path, help="only re-render the section from a saved summary.json")


@dataclass
class ReplayStack:
    servers: Servers
    provider: ProviderProcess
    dsn: str
    documents: int
    token: str  # an API key without rpm or token budget: the default request path

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client that sends the stack's API key."""
        return httpx.AsyncClient(headers=bearer(self.token), **kwargs)


@asynccontextmanager
async def replay_stack(args: argparse.Namespace, key_name: str) -> AsyncIterator[ReplayStack]:
    """Embedded Postgres + Valkey, the model stand-in at `args`' pace, the corpus, and an API key."""
    with embedded_servers(DATA_DIR) as servers:
        async with ProviderProcess(args.first_token_delay, args.token_interval, args.answer_tokens) as provider:
            dsn, documents = await ensure_corpus(servers, args.limit_corpus)
            token = await create_key(dsn, key_name)
            yield ReplayStack(servers, provider, dsn, documents, token)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "provider":
    _provider_main(*sys.argv[2:])
