"""Postgres connections and schema migrations.

Migrations are ordered SQL files in `service/postgres/migrations/`, applied at start under an
advisory lock and recorded in `schema_migrations`. A 40-line runner on asyncpg is simpler
than pulling in Alembic (SQLAlchemy) or yoyo (a sync driver) for plain SQL files.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
from pgvector.asyncpg import register_vector

MIGRATION_LOCK = 0x72616763  # "ragc": serialises concurrent starts (API workers, ingest)
NOTIFY_CHANNEL = "ragcache_corpus"


# What a refused, unreachable, misconfigured (a bad DATABASE_URL parameter is an InterfaceError)
# or failing database raises; the CLIs catch these and print `database_failure`.
DATABASE_ERRORS: tuple[type[Exception], ...] = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


class CorpusMismatchError(RuntimeError):
    """The configured embedding model differs from the one the corpus was built with."""


def database_failure(exc: BaseException) -> str:
    """One of DATABASE_ERRORS as one line for a command-line tool: its kind and its reason, no traceback."""
    reason = " ".join(str(exc).split())
    return f"cannot use the database: {type(exc).__name__}" + (f": {reason}" if reason else "")


@dataclass(frozen=True)
class SchemaParams:
    embedding_model: str
    embedding_dim: int
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("service.postgres.migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def render(sql: str, params: SchemaParams) -> str:
    return (
        sql.replace("{embedding_dim}", str(params.embedding_dim))
        .replace("{hnsw_m}", str(params.hnsw_m))
        .replace("{hnsw_ef_construction}", str(params.hnsw_ef_construction))
    )


async def _init_connection(conn: asyncpg.Connection) -> None:
    with contextlib.suppress(ValueError):  # no vector type yet: a database not migrated (status, delete)
        await register_vector(conn)


# `asyncpg.Pool(...)` takes as required what `asyncpg.create_pool` defaults (max_queries, the
# connection and record classes, ...; init_size since 0.32): read them from create_pool, so a
# BoundedPool is built as create_pool builds a Pool in whichever asyncpg is installed.
_CREATE_POOL_DEFAULTS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(asyncpg.create_pool).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is not inspect.Parameter.empty
}


class BoundedPool(asyncpg.Pool):  # type: ignore[misc]
    """An asyncpg pool whose `acquire` (and so `fetch`, `execute`, …) waits at most
    `acquire_timeout` seconds for a free connection, then raises `TimeoutError`."""

    acquire_timeout: float | None = None

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=timeout if timeout is not None else self.acquire_timeout)


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    ef_search: int = 40,
    max_scan_tuples: int = 20_000,
    iterative_scan: str = "relaxed_order",
    settings: Mapping[str, str] | None = None,
    statement_timeout_s: float = 0,
    command_timeout_s: float = 0,
    acquire_timeout_s: float = 0,
    **kwargs: Any,
) -> asyncpg.Pool:
    """A pool whose connections speak pgvector's binary format. Call after `migrate`.

    HNSW settings go in the startup packet: asyncpg runs RESET ALL whenever a connection
    returns to the pool, which would undo a SET made once per connection, and a SET LOCAL per
    search would cost a transaction (two more round trips) on every retrieval. `iterative_scan`
    and `settings` (more server settings) are parameters only so the filtered-retrieval benchmark
    can show what "off" costs and force a plan.

    The timeouts (seconds; 0: none) bound what a hung or locked Postgres can cost a request:
    the server cancels a statement after `statement_timeout_s` (`QueryCanceledError`),
    asyncpg stops waiting for a reply after `command_timeout_s`, and taking a connection
    from the pool waits at most `acquire_timeout_s` (both `TimeoutError`). The API sets
    all three (RAG_DB_*_TIMEOUT_S); ingest and the CLI keep none.
    """
    server_settings = {
        "hnsw.ef_search": str(int(ef_search)),  # recall vs speed of HNSW search
        # Filtered searches (a collection holding 1 % of the chunks) keep scanning instead of
        # coming back short (pgvector issue #259), but stop after this many tuples.
        "hnsw.iterative_scan": iterative_scan,
        "hnsw.max_scan_tuples": str(int(max_scan_tuples)),
        **(settings or {}),
    }
    if statement_timeout_s > 0:
        server_settings["statement_timeout"] = str(max(1, round(statement_timeout_s * 1000)))  # milliseconds
    pool = BoundedPool(
        dsn,
        **{
            **_CREATE_POOL_DEFAULTS,
            "min_size": min_size,
            "max_size": max_size,
            "init": _init_connection,
            "command_timeout": command_timeout_s or None,
            "server_settings": server_settings,
            **kwargs,
        },
    )
    pool.acquire_timeout = acquire_timeout_s or None
    await pool
    return pool


async def migrate(dsn: str, params: SchemaParams) -> list[int]:
    """Apply pending migrations, then refuse a corpus built with another embedding model.

    Returns the versions applied by this call.
    """
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY, name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            done = []
            for migration in load_migrations():
                if migration.version in applied:
                    continue
                await conn.execute(render(migration.sql, params))
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
                done.append(migration.version)
            row = await conn.fetchrow("SELECT embedding_model, embedding_dim FROM corpus")
            if row is None:
                await conn.execute(
                    "INSERT INTO corpus (embedding_model, embedding_dim) VALUES ($1, $2)",
                    params.embedding_model,
                    params.embedding_dim,
                )
            elif (row["embedding_model"], row["embedding_dim"]) != (
                params.embedding_model,
                params.embedding_dim,
            ):
                raise CorpusMismatchError(
                    f"the corpus was built with embedding model {row['embedding_model']!r} "
                    f"({row['embedding_dim']} dimensions) but {params.embedding_model!r} "
                    f"({params.embedding_dim} dimensions) is configured; set RAG_EMBEDDING_MODEL back, "
                    "or start from an empty database and re-ingest"
                )
            return done
    finally:
        await conn.close()
