"""Helpers shared by every benchmark in `bench/`.

Machine description and load average, percentiles, clean settings/environment for the
servers under test, API keys for them, ingesting a corpus, serving an ASGI app in-process,
parsing an SSE body, and writing one section of docs/benchmarks.md without touching the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"

# Environment variables that would change how a server under test behaves.
_SERVICE_ENV_PREFIXES = ("RAG_", "OPENAI_", "ANTHROPIC_", "DATABASE_URL", "REDIS_URL")


def say(message: str) -> None:
    """Progress goes to stderr; stdout carries only the final report."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default) of unsorted values; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float) -> str:
    return "–" if math.isnan(seconds) else f"{seconds * 1000:.2f}"


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def nproc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (NaN where the system has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (math.nan, math.nan, math.nan)


def load_text(loads: Sequence[float] | None = None) -> str:
    """`loads` (default: now) as "1.23 / 0.98 / 0.77"."""
    values = load_average() if loads is None else loads
    return "n/a" if any(math.isnan(x) for x in values) else " / ".join(f"{x:.2f}" for x in values)


def machine_line() -> str:
    return f"{cpu_model()}, nproc {nproc()}, Python {platform.python_version()}, {platform.system()}"


def today() -> str:
    return dt.date.today().isoformat()


def revision() -> str:
    """The commit measured, marked "+ uncommitted changes" when service/ or ingest/ differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "service", "ingest"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


# --------------------------------------------------------------------------- servers under test


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_database(dsn: str, name: str) -> str:
    """`dsn` pointed at the database `name` on the same server."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus every service setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SERVICE_ENV_PREFIXES)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def make_settings(database_url: str, redis_url: str | None, data_dir: Path, **overrides: Any) -> Settings:
    """Settings from explicit values only: no .env, nothing leaks in from the environment."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "data_dir": data_dir,
        "anthropic_api_key": None,
        "openai_api_key": None,
        "openai_base_url": None,
        "anthropic_base_url": None,
        "embedding_provider": "local",
        "embedding_model": None,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def ingest_path(settings: Settings, embedder: Any, path: Path, fmt: str = "auto", **discover_kw: Any) -> Any:
    """`rag-ingest add PATH` in-process; returns the IngestReport. Idempotent (unchanged docs are skipped)."""
    from ingest.loaders import discover, load
    from ingest.pipeline import IngestOptions, ingest_documents
    from service.postgres.corpus import open_corpus

    async with open_corpus(settings) as corpus:
        entries, failures = discover([str(path)], **discover_kw)
        items = [*failures, *(doc for entry in entries for doc in load(entry, fmt))]  # type: ignore[arg-type]
        options = IngestOptions(settings.chunk_tokens, settings.chunk_overlap, settings.embed_batch_size)
        report = await ingest_documents(corpus.store, embedder, items, options)
        if report.failures:
            raise SystemExit(f"ingest of {path}: {len(report.failures)} failures, first: {report.failures[0]}")
        return report


async def create_key(dsn: str, name: str, scope: str = "query") -> str:
    """A real API key in the database at `dsn` (migrated first, as the app would), for the bench client.

    No `rpm` and no `tokens_per_day`: the server then authenticates from its in-process key cache
    and makes no rate-limit call to Redis, so a benchmark measures the default path.
    """
    from service.http.auth import KeyStore
    from service.postgres.corpus import open_corpus

    settings = make_settings(dsn, None, RESULTS)  # with a database URL, the data dir is not used
    async with open_corpus(settings) as corpus:
        token, _ = await KeyStore(corpus.pool).create(name, "admin" if scope == "admin" else "query")
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sse_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The events of a complete Server-Sent Events body as (name, JSON data); comments are skipped.

    Bytes and b"\n" only: answers may hold characters that str.splitlines() would also split on.
    """
    events: list[tuple[str, dict[str, Any]]] = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = "", []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
        if name or data:
            events.append((name or "message", json.loads(b"\n".join(data)) if data else {}))
    return events


@asynccontextmanager
async def serve_in_process(app: Any) -> AsyncIterator[str]:
    """Run an ASGI app on a real uvicorn server (loopback, free port) in this event loop."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while not server.started and not task.done():
        if loop.time() > deadline:
            raise TimeoutError("uvicorn did not start within 120 s")
        await asyncio.sleep(0.05)
    if task.done():
        task.result()
        raise RuntimeError("uvicorn exited during startup")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


# --------------------------------------------------------------------------- docs/benchmarks.md


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> str:
    """`align`: one char per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


NOTES = "### Notes"


def update_section(heading: str, body: str, path: Path = DOCS) -> None:
    """Replace the `## heading` section of docs/benchmarks.md (append it if missing).

    Other sections are kept byte for byte, and so is a `### Notes` subsection at the end of
    this one; a lock file serialises concurrent writers.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = f"## {heading}"
    lock_path = Path(tempfile.gettempdir()) / "ragcache-benchmarks-md.lock"  # outside the tree, never removed
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else "# Benchmarks\n\nNumbers measured by `bench/`.\n"
        lines = text.splitlines(keepends=True)
        start = next((i for i, line in enumerate(lines) if line.rstrip() == marker), None)
        section = f"{marker}\n\n{body.strip()}\n\n"
        if start is None:
            new = text.rstrip("\n") + "\n\n" + section
        else:
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
            # A hand-written "### Notes" subsection (findings, caveats) survives re-runs.
            notes = next((i for i in range(start + 1, end) if lines[i].rstrip() == NOTES), None)
            if notes is not None:
                section += "".join(lines[notes:end]).rstrip("\n") + "\n\n"
            new = "".join(lines[:start]) + section + "".join(lines[end:])
        path.write_text(new.rstrip("\n") + "\n")


def publish(section: str, body: str, *, no_write: bool, run_dir: Path | None = None) -> None:
    """Print the section, say where the raw results are, and write it into docs/benchmarks.md unless `no_write`."""
    print(body)
    if run_dir is not None:
        say(f"raw results: {run_dir / 'summary.json'}")
    if not no_write:
        update_section(section, body)
        say(f"wrote section “{section}” of docs/benchmarks.md")
