"""`rag-serve`: run the API, starting embedded Postgres/Valkey when no URLs are configured."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, TextIO

import typer
import uvicorn
from rich.console import Console
from rich.markup import escape

from service.embedded import EmbeddedPostgres, EmbeddedServerError, EmbeddedValkey, write_private_file
from service.http.auth import KeyStore, parse_key, verify
from service.http.proxies import uvicorn_proxy_options
from service.http.slow_clients import protocol_class
from service.observability.logs import configure_logging
from service.observability.prometheus import prepare_multiprocess_dir
from service.postgres.corpus import database_url, open_corpus
from service.redis.client import redis_url
from service.settings import Settings

console = Console(stderr=True)
app = typer.Typer(add_completion=False, help="Run the ragcache API.")


async def _ingest_examples_if_empty(settings: Settings, examples: Path) -> None:
    from ingest.loaders import FileLimits, discover, load
    from ingest.pipeline import IngestOptions, ingest_documents

    async with open_corpus(settings, with_embedder=True) as corpus:
        if await corpus.pool.fetchval("SELECT count(*) FROM documents"):
            return
        assert corpus.embedder is not None
        entries, failures = discover([str(examples)], source="handbook", data_dir=settings.data_dir)
        limits = FileLimits(settings.ingest_max_file_bytes, settings.ingest_file_timeout_s)
        items = [*failures, *(doc for entry in entries for doc in load(entry, "auto", limits))]
        options = IngestOptions.from_settings(settings)
        report = await ingest_documents(corpus.store, corpus.embedder, items, options)
        console.print(f"ingested {report.added} example documents ({report.chunks} chunks) from {examples}/")


LOCAL_KEY_FILE = "local-api-key"


def torch_threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Share the cores among the workers' local embedding models (at least one thread each)."""
    return max(1, (cores or os.cpu_count() or 1) // workers)


async def _local_key(settings: Settings) -> str:
    """The admin key of this data directory, created on first use and kept (mode 0600) for `make run`.

    A key that was revoked, or belongs to another database, is replaced by a new one.
    """
    path = settings.data_dir / LOCAL_KEY_FILE
    async with open_corpus(settings) as corpus:
        keys = KeyStore(corpus.pool)
        if path.is_file():
            token = path.read_text(encoding="utf-8").strip()
            parsed = parse_key(token)
            stored = await keys.get(parsed[0]) if parsed else None
            if parsed and verify(stored, parsed[1]):
                return token
        token, _ = await keys.create("local (make run)", "admin")
    write_private_file(path, token + "\n")
    return token


def key_may_be_shown(settings: Settings, stream: TextIO) -> bool:
    """Print the local admin key only to a person: a terminal, or console-format logs (`make run`).

    Where stderr is JSON lines it is a log stream on its way to a shipper, and the banner
    bypasses the log scrubber (service/observability/logs.py).
    """
    return stream.isatty() or settings.log_format == "console"


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's connection limits from the settings (slow clients: see service/http/slow_clients.py)."""
    return {
        "http": protocol_class(),
        "timeout_keep_alive": settings.http_keep_alive_s,
        "limit_concurrency": settings.http_limit_concurrency,
    }


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default RAG_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default RAG_PORT).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes sharing cache, limits and metrics.")] = 1,
    ingest_examples: Annotated[
        bool, typer.Option(help="Ingest ./examples when the corpus is empty (what `make run` does).")
    ] = False,
    local_key: Annotated[
        bool,
        typer.Option(help=f"Create (once) an admin key kept in RAG_DATA_DIR/{LOCAL_KEY_FILE} and print it."),
    ] = False,
) -> None:
    settings = Settings()
    host = host or settings.host
    port = port if port is not None else settings.port
    # The embedded servers must stop on every way out. uvicorn turns SIGTERM into a graceful
    # shutdown, then restores the handler it found and raises the signal again: with the
    # default handler the process would die there, skipping `finally`. This handler (also the
    # one in force before and after uvicorn) makes SIGTERM and SIGHUP an exit that unwinds.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    pg: EmbeddedPostgres | None = None
    valkey: EmbeddedValkey | None = None
    try:
        # Start embedded servers here, once, and hand their URLs to the workers through the environment.
        dsn, pg = database_url(settings)
        rurl, valkey = redis_url(settings)
        os.environ["DATABASE_URL"] = dsn
        os.environ["REDIS_URL"] = rurl
        settings = Settings()
        if ingest_examples and Path("examples").is_dir():
            asyncio.run(_ingest_examples_if_empty(settings, Path("examples")))
        key = asyncio.run(_local_key(settings)) if local_key else "$RAG_API_KEY"
        body = '{"question": "How do I flush the cache?"}'
        auth = shlex.quote(f"Authorization: Bearer {key}") if local_key else f'"Authorization: Bearer {key}"'
        curl = (
            f"curl -N http://{host}:{port}/rag/stream -H {auth} "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
        )
        shown = not local_key or key_may_be_shown(settings, sys.stderr)
        if not shown:  # the same line, without the key
            curl = curl.replace(key, f"$(cat {shlex.quote(str(settings.data_dir / LOCAL_KEY_FILE))})")
        key_line = ""
        if local_key:
            where = settings.data_dir / LOCAL_KEY_FILE
            key_line = (
                f"admin API key (kept in {where}): {key}\n"
                if shown
                else f"admin API key kept in {where} (not printed: stderr is a JSON log stream)\n"
            )
        # Plain writes, not rich: the curl must stay on one line whatever the terminal width.
        sys.stderr.write(
            f"\nragcache on http://{host}:{port}  (dashboard: http://{host}:{port}/dashboard)\n"
            + key_line
            + f"try:\n  {curl}\n\n"
        )
        if workers > 1:  # one worker runs in this process, where prometheus-client is already set up
            prepare_multiprocess_dir(settings.data_dir)
            if settings.torch_threads is None:  # read by each worker's Settings()
                os.environ["RAG_TORCH_THREADS"] = str(torch_threads_per_worker(workers))
        # uvicorn's own messages go through our handler too (log_config=None); each worker sets it
        # up again in app_factory. Its access log is off: AccessLog writes a richer line per request.
        configure_logging(settings.log_level, json=settings.log_format == "json")
        uvicorn.run(
            "service.http.app:app_factory",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=settings.log_level,
            log_config=None,
            access_log=False,
            **uvicorn_proxy_options(settings),
            **uvicorn_options(settings),
        )
    except EmbeddedServerError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    finally:
        if valkey is not None:
            valkey.stop()
        if pg is not None:
            pg.stop()


def main() -> None:
    app()
