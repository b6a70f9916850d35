"""The scaffolding every benchmark shares: machine facts, statistics, servers, the model stand-in, reports.

A benchmark module holds its scenario and its numbers; it starts servers, asks questions (through the
one load client in `tests.support.load`) and hands a few tables to `publish`, which replaces only its
own `## Section` of docs/benchmarks.md. `--quick` runs at the smallest size and writes nowhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from tests.support.load import Client, ProviderProcess, Reply, fetch
from tests.support.processes import Served, clean_env, serve_process
from tests.support.servers import SHARED_DATA, bearer, free_port, make_key, make_settings, with_database

ROOT = Path(__file__).resolve().parent.parent
DOCS = Path(os.environ.get("BENCH_DOCS", ROOT / "docs" / "benchmarks.md"))
RESULTS = ROOT / "bench" / "results"
MSMARCO = SHARED_DATA / "msmarco-5k"
PARAPHRASES = ROOT / "bench" / "paraphrases.jsonl"
DATA_DIR = RESULTS / "replay"
BIN = Path(sys.executable).parent
WARM_UP = ["what is the boiling point of water at altitude", "how do vaccines train the immune system"]
__all__ = ["SHARED_DATA", "Client", "ProviderProcess", "Reply", "bearer", "fetch", "make_settings", "with_database"]


def say(message: str) -> None:
    """Progress goes to stderr; stdout carries only the report."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default) of the values that are not NaN; NaN when none."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def stats(values: Sequence[float]) -> dict[str, float]:
    clean = [v for v in values if not math.isnan(v)]
    p = {f"p{q}": percentile(clean, q) for q in (50, 95, 99)}
    return p | {"max": max(clean, default=math.nan), "n": len(clean)}


def fmt_ms(value: float) -> str:
    """Milliseconds, to a sensible precision ("–" for NaN)."""
    return "–" if math.isnan(value) else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def ms(seconds: float) -> str:
    """Seconds shown as milliseconds."""
    return fmt_ms(seconds * 1000)


# --------------------------------------------------------------------------- machine


def machine_line() -> str:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
    return f"{cpu}, nproc {len(os.sched_getaffinity(0))}, Python {platform.python_version()}, {platform.system()}"


def load_text() -> str:
    """The 1 / 5 / 15-minute load averages ("n/a" where the platform has none)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def revision() -> str:
    """The commit measured, marked when service/ or ingest/ differ from it."""
    try:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "service", "ingest"], capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


# --------------------------------------------------------------------------- options and reports


def arguments(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser with the options every benchmark has: --quick (smallest size, writes nowhere), --no-write."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{prog}", description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smallest size, a smoke run: write nothing")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not update docs")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None, **quick: Any) -> argparse.Namespace:
    """Parse `argv`; with --quick, the `quick` sizes replace the defaults and nothing is written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        args.no_write = True
    args.command = shlex.join(["python", "-m", parser.prog.split()[-1], *argv])
    return args


def table(header: str | Sequence[str], rows: Iterable[str | Sequence[object]], align: str = "") -> str:
    """A Markdown table; the header and each row are a list of cells or one string "a | b | c";
    `align` has one 'l' or 'r' per column, the columns it does not reach are right-aligned (default: first left)."""
    header = header.split(" | ") if isinstance(header, str) else header
    rows = [row.split(" | ") if isinstance(row, str) else row for row in rows]
    align = (align or "l").ljust(len(header), "r")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)])


def run_line(command: str, **facts: object) -> str:
    """The first line of every section: command, date, machine, revision, load, and any `facts`."""
    extra = "".join(f"; {k.replace('_', ' ')}: {v}" for k, v in facts.items())
    return (
        f"Command: `{command}` — {dt.datetime.now():%Y-%m-%d %H:%M} — {machine_line()} — revision {revision()}"
        f" — load average {load_text()}{extra}."
    )


def section(args: argparse.Namespace, *parts: str, **facts: object) -> str:
    """A section's body: the run line (with `facts`), then the non-empty `parts`, a blank line apart."""
    return "\n\n".join([run_line(args.command, **facts), *(part for part in parts if part)])


def update_section(heading: str, body: str) -> None:
    """Replace the `## heading` section of DOCS (append it if missing); other sections and a `### Notes` stay."""
    marker = f"## {heading}"
    with (Path(tempfile.gettempdir()) / "ragcache-benchmarks-md.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
        lines = text.splitlines(keepends=True)
        start = next((i for i, line in enumerate(lines) if line.rstrip() == marker), None)
        new_section = f"{marker}\n\n{body.strip()}\n\n"
        if start is None:
            new = text.rstrip("\n") + "\n\n" + new_section
        else:
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
            notes = next((i for i in range(start + 1, end) if lines[i].rstrip() == "### Notes"), None)
            if notes is not None:
                new_section += "".join(lines[notes:end]).rstrip("\n") + "\n\n"
            new = "".join(lines[:start]) + new_section + "".join(lines[end:])
        DOCS.write_text(new.rstrip("\n") + "\n")


def publish(
    heading: str, body: str, args: argparse.Namespace, summary: object = None, run_dir: Path | None = None
) -> None:
    """Print the section, save the raw `summary`, and update docs/benchmarks.md unless --no-write/--quick."""
    print(body)
    if run_dir is not None and summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        say(f"raw results: {run_dir / 'summary.json'}")
    if not args.no_write:
        update_section(heading, body)
        say(f"wrote section “{heading}” of {DOCS}")


def publish_run(section: str, run: Coroutine[Any, Any, str], args: argparse.Namespace, *needed: Path) -> int:
    """`main`'s last step: publish what `run` returns, or exit 2 naming the data files that are missing."""
    if missing := [str(path) for path in needed if not path.is_file()]:
        run.close()
        print(f"benchmark data not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    publish(section, asyncio.run(run), args)
    return 0


def run_dir(name: str) -> Path:
    path = RESULTS / name / time.strftime("%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- data and corpus


@dataclass(frozen=True)
class Query:
    query_id: str
    text: str
    paraphrases: tuple[str, ...]


def jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (bytes and b"\\n" only: passages hold characters splitlines() splits on)."""
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line.strip()]


def load_queries(root: Path = MSMARCO, paraphrases: Path = PARAPHRASES) -> list[Query]:
    extra: dict[str, list[str]] = {}
    for row in jsonl(paraphrases):
        extra.setdefault(str(row["query_id"]), []).append(str(row["text"]))
    queries = [
        Query(str(r["_id"]), str(r["text"]), tuple(extra.pop(str(r["_id"]), []))) for r in jsonl(root / "queries.jsonl")
    ]
    if extra:
        raise SystemExit(f"{paraphrases}: unknown query ids {sorted(extra)}")
    return queries


def passage_questions(n: int, *, prefix: str, skip: int = 0) -> list[str]:
    """`n` distinct questions, one per msmarco passage (every 7th, from `skip`), in a fixed order."""
    rows = jsonl(MSMARCO / "corpus.jsonl")
    out: list[str] = []
    for i in range(len(rows)):
        words = re.findall(r"[a-z][a-z']+", str(rows[(skip + i * 7) % len(rows)]["text"]).lower())[:7]
        question = f"{prefix} {' '.join(words)}"
        if len(words) >= 5 and question not in out:
            out.append(question)
            if len(out) == n:
                return out
    raise SystemExit(f"only {len(out)} distinct questions could be built, {n} needed")


async def create_key(dsn: str) -> str:
    """A query key without `rpm` or `tokens_per_day`: the default path (no rate-limit call to Redis)."""
    return await make_key(make_settings(dsn, "redis://127.0.0.1:1", RESULTS), "query")


class TimedEmbedder:
    """The real embedder behind an object of its own (to wrap or replace); adds up the time spent awaiting it."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.model, self.dim, self.seconds = inner, inner.model, inner.dim, 0.0

    async def embed(self, texts: Sequence[str]) -> Any:
        started = time.perf_counter()
        try:
            return await self.inner.embed(texts)
        finally:
            self.seconds += time.perf_counter() - started


# --------------------------------------------------------------------------- servers under test


@dataclass
class Servers:
    admin_dsn: str
    redis_base: str
    data_dir: Path


@contextlib.contextmanager
def embedded_servers(data_dir: Path | None = DATA_DIR) -> Iterator[Servers]:
    """Embedded Postgres + Valkey under `data_dir` (started, or attached to if already running), stopped after;
    `None`: in a temporary directory, removed after."""
    from service.embedded import start_postgres, start_valkey

    with contextlib.ExitStack() as cleanup:
        if data_dir is None:
            data_dir = Path(tempfile.mkdtemp(prefix="ragbench-"))
            cleanup.callback(shutil.rmtree, data_dir, ignore_errors=True)  # after the servers stop
        pg = start_postgres(data_dir)
        cleanup.callback(pg.stop)
        valkey = start_valkey(data_dir)
        cleanup.callback(valkey.stop)
        yield Servers(pg.url, valkey.url, data_dir)


async def fetchval(dsn: str, sql: str, *args: object) -> Any:
    """One statement on a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def _documents(dsn: str) -> int:
    if not await fetchval(dsn, "SELECT to_regclass('documents') IS NOT NULL"):
        return 0
    return int(await fetchval(dsn, "SELECT count(*) FROM documents"))


async def ensure_corpus(servers: Servers, limit: int | None) -> tuple[str, int]:
    """A database holding msmarco-5k (or its first `limit` passages), ingested once with `rag-ingest`, then reused."""
    corpus = MSMARCO / "corpus.jsonl"
    name = "msmarco_full" if limit is None else f"msmarco_{limit}"
    if not await fetchval(servers.admin_dsn, "SELECT 1 FROM pg_database WHERE datname = $1", name):
        await fetchval(servers.admin_dsn, f'CREATE DATABASE "{name}"')
    dsn, data_dir = with_database(servers.admin_dsn, name), servers.data_dir
    if limit is not None:  # beside the data directory, not in it: rag-ingest never ingests from RAG_DATA_DIR
        head = b"".join(line + b"\n" for line in corpus.read_bytes().split(b"\n")[:limit])
        corpus = data_dir.parent / f"corpus-{limit}" / "corpus.jsonl"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        if not corpus.exists() or corpus.read_bytes() != head:  # rewritten only when it differs
            corpus.write_bytes(head)
    expected = len(jsonl(corpus))
    have = await _documents(dsn)
    if have != expected:
        say(f"ingesting {expected} passages from {corpus} into {name} (has {have}) …")
        env = clean_env(DATABASE_URL=dsn, RAG_DATA_DIR=str(data_dir), RAG_LOG_LEVEL="warning")
        cmd = [str(BIN / "rag-ingest"), "add", str(corpus), "--format", "beir", "--json"]
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=str(data_dir), stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"rag-ingest failed ({proc.returncode}): {out.decode()[-2000:]}")
        have = await _documents(dsn)
    return dsn, have


async def fresh_caches(dsn: str, redis_url: str) -> None:
    """Empty the answer cache (the whole logical Redis db) and the semantic index."""
    client = aioredis.from_url(redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    if await fetchval(dsn, "SELECT to_regclass('semantic_cache') IS NOT NULL"):
        await fetchval(dsn, "DELETE FROM semantic_cache")


# --------------------------------------------------------------------------- what the replay benchmarks share


async def ask(url: str, token: str, body: Mapping[str, Any], limit_s: float = 120) -> Reply:
    """POST /rag/stream on a connection of its own."""
    return await fetch(url, "POST", "/rag/stream", dict(body), headers=bearer(token), limit_s=limit_s)


async def warm_up(url: str, token: str, n: int = 1) -> None:
    """Pay a server's first-request costs with `cache: bypass` requests (n at a time), outside any measurement."""
    for question in WARM_UP:
        replies = await asyncio.gather(
            *(ask(url, token, {"question": f"{question} {i}", "cache": "bypass"}) for i in range(n))
        )
        if bad := [r for r in replies if not r.ok]:
            raise SystemExit(f"warm-up of {url} failed: {bad[0].outcome} {bad[0].error}")


async def closed_loop(
    clients: Sequence[Client], seconds: float, send: Callable[[Client], Awaitable[Reply]]
) -> list[Reply]:
    """Every keep-alive client `send`s back to back until `seconds` have passed; the replies, as they completed."""
    deadline, replies = time.monotonic() + seconds, list[Reply]()

    async def worker(client: Client) -> None:
        while time.monotonic() < deadline:
            replies.append(await send(client))

    await asyncio.gather(*(worker(c) for c in clients))
    return replies


def warnings_in(log: Path) -> dict[str, int]:
    """WARNING/ERROR lines of a server log (JSON lines or plain text), digits collapsed to N."""
    counts: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            record: Any = None
            with contextlib.suppress(ValueError):
                record = json.loads(line) if line.startswith("{") else None
            if isinstance(record, dict) and str(record.get("level", "")).upper() in ("WARNING", "ERROR", "CRITICAL"):
                counts[
                    f"{record['level']} {record.get('logger', '?')}: "
                    f"{re.sub(r'[0-9]+', 'N', str(record.get('event')))[:100]}"
                ] += 1
            elif record is None and ("Traceback" in line or re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line)):
                counts[re.sub(r"[0-9]+", "N", line)[:100]] += 1
    return dict(counts.most_common(8))


MEMORY_PROBE = """
import json, sys
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
mb = {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}
print(json.dumps({"rss_mb": mb["VmRSS"], "peak_mb": mb["VmHWM"], "torch": "torch" in sys.modules}))
"""


def child_memory(setup: str) -> dict[str, Any]:
    """Run the Python `setup` in a fresh interpreter, then its resident and peak MB, and whether it imported torch."""
    command = [sys.executable, "-c", setup + MEMORY_PROBE]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True, env=clean_env())
    parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


def replay_arguments(
    parser: argparse.ArgumentParser,
    *,
    first_token_delay: float = 0.6,
    token_interval: float = 0.02,
    answer_tokens: int = 150,
    limit_corpus: int | None = None,
) -> None:
    """Options of the replay benchmarks: corpus size and the model stand-in's pace."""
    parser.add_argument("--limit-corpus", type=int, default=limit_corpus, help="ingest only the first N passages")
    parser.add_argument("--first-token-delay", type=float, default=first_token_delay, help="seconds")
    parser.add_argument("--token-interval", type=float, default=token_interval, help="seconds")
    parser.add_argument("--answer-tokens", type=int, default=answer_tokens)


@dataclass
class ReplayStack:
    servers: Servers
    provider: ProviderProcess
    dsn: str
    documents: int
    token: str

    async def fresh(self, redis_db: int) -> str:
        """The URL of logical Redis db `redis_db`, emptied, with the semantic index emptied too."""
        base = self.servers.redis_base
        redis_url = f"{base}{'&' if '?' in base else '?'}db={redis_db}"
        await fresh_caches(self.dsn, redis_url)
        return redis_url

    def serve(
        self, redis_url: str, log: Path, env: Mapping[str, str] | None = None, workers: int = 1
    ) -> contextlib.AbstractAsyncContextManager[Served]:
        """`rag-serve --port P --workers N` as its own process over this stack's corpus, answering through its
        model stand-in, on `redis_url`."""
        port = free_port()
        defaults = {"RAG_PROVIDER_MAX_RETRIES": "0", "RAG_LOG_LEVEL": "warning"}  # `env` may override these
        environment = clean_env(
            DATABASE_URL=self.dsn,
            REDIS_URL=redis_url,
            RAG_DATA_DIR=str(DATA_DIR),
            ANTHROPIC_API_KEY="sk-ant-bench",
            ANTHROPIC_BASE_URL=self.provider.base_url,
            **(defaults | dict(env or {})),
        )
        return serve_process(f"{BIN / 'rag-serve'} --port {port} --workers {workers}", port, environment, log, DATA_DIR)


@asynccontextmanager
async def replay_stack(args: argparse.Namespace, servers: Servers | None = None) -> AsyncIterator[ReplayStack]:
    """Embedded Postgres + Valkey (or `servers`), the model stand-in at `args`' pace, the corpus, and an API key."""
    with embedded_servers() if servers is None else contextlib.nullcontext(servers) as db:
        async with ProviderProcess(
            args.first_token_delay, args.token_interval, args.answer_tokens, oracle=getattr(args, "oracle", None)
        ) as provider:
            dsn, documents = await ensure_corpus(db, args.limit_corpus)
            yield ReplayStack(db, provider, dsn, documents, await create_key(dsn))


def model_line(args: argparse.Namespace, documents: int) -> str:
    """One sentence on the replay set-up: corpus and the model stand-in's pace."""
    return (
        f"Corpus: msmarco-5k, {documents:,} passages, in embedded Postgres + pgvector; embedded Valkey; `rag-serve` "
        f"as its own process with a real API key. Model: the loopback `ProviderServer` (tests/support) in a process "
        f"of its own behind the real Anthropic SDK, first token after {args.first_token_delay * 1000:.0f} ms, then "
        f"{args.answer_tokens} tokens {args.token_interval * 1000:.0f} ms apart."
    )
