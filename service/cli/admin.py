"""`rag-admin`: operator commands for API keys and the answer cache.

It talks to Postgres and Redis directly with the operator's DATABASE_URL / REDIS_URL (or
the embedded servers under RAG_DATA_DIR): those credentials outrank any API key, which is
also how the first admin key comes to exist.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NoReturn, TypeVar

import redis.asyncio as aioredis
import typer
from rich.console import Console
from rich.table import Table

from service.http.auth import ApiKey, KeyStore, Scope, parse_key
from service.observability.dashboard_model import SeriesReader
from service.policy.collections import parse_grant
from service.postgres.corpus import open_corpus
from service.postgres.db import DATABASE_ERRORS
from service.redis.answer_cache import AnswerCache
from service.redis.client import cli_client, redis_url
from service.redis.keyspace import REDIS_ERRORS
from service.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Administer ragcache.")
cache_app = typer.Typer(no_args_is_help=True, help="The answer cache.")
app.add_typer(cache_app, name="cache")
keys_app = typer.Typer(no_args_is_help=True, help="API keys (stored only as hashes).")
app.add_typer(keys_app, name="keys")
err = Console(stderr=True)

T = TypeVar("T")

# `--range` of `cache stats`, in minutes (the dashboard offers the same three).
STATS_RANGES = {"1h": 60, "24h": 24 * 60, "7d": 7 * 24 * 60}


def _with_cache(action: Callable[[AnswerCache], Awaitable[T]]) -> T:
    return _with_redis(lambda client, settings: action(AnswerCache(client, ttl_s=settings.cache_ttl_s)))


def _with_redis(action: Callable[[aioredis.Redis, Settings], Awaitable[T]]) -> T:
    settings = Settings()

    async def run() -> T:
        url, _server = redis_url(settings)
        client = cli_client(url)
        try:
            return await action(client, settings)
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    except REDIS_ERRORS as exc:
        err.print(f"[red]error:[/] cannot reach Redis: {type(exc).__name__}: {exc}")
        raise typer.Exit(2) from None


@cache_app.command("stats")
def cache_stats(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    range_: Annotated[
        str, typer.Option("--range", help="Window of the metrics: 1h, 24h or 7d.", case_sensitive=False)
    ] = "24h",
) -> None:
    """Cached answers, and what the cache did over a range (all workers, from Redis)."""
    window = range_.lower()
    if window not in STATS_RANGES:
        err.print(f"[red]error:[/] --range must be one of {', '.join(STATS_RANGES)}")
        raise typer.Exit(2)

    async def collect(client: aioredis.Redis, settings: Settings) -> dict[str, Any]:
        answers = dict(await AnswerCache(client, ttl_s=settings.cache_ttl_s).stats())
        summary = await SeriesReader(client).summary(minutes=STATS_RANGES[window])
        return {**answers, "range": window, "metrics": summary}

    stats = _with_redis(collect)
    if as_json:
        typer.echo(json.dumps(stats))
    else:
        typer.echo(f"answers cached: {stats['answers']}")
        typer.echo(_describe(window, stats["metrics"]))


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def _describe(window: str, m: dict[str, Any]) -> str:
    """The summary as a few readable lines (the same numbers as --json and the dashboard)."""
    req, ratio, saved, ttft = m["requests"], m["hit_ratio"], m["saved"], m["ttft_ms"]
    outcomes = " · ".join(f"{k} {v:,}" for k, v in req["by_outcome"].items())
    lines = [
        f"last {window}: {req['total']:,} requests, {req['answered']:,} answered, {req['failed']:,} failed",
        f"  outcomes: {outcomes}",
        f"  hit ratio: {_pct(ratio['overall'])} (exact {_pct(ratio['exact'])}, semantic {_pct(ratio['semantic'])}, "
        f"coalesced {_pct(ratio['coalesced'])})",
        f"  provider calls: {m['provider_calls']['made']:,} made, {m['provider_calls']['avoided']:,} avoided",
        f"  saved: {saved['tokens']:,} tokens ({saved['input_tokens']:,} in, {saved['output_tokens']:,} out), "
        f"${saved['cost_usd']:.4f}; paid ${m['tokens']['cost_usd']:.4f}",
        f"  TTFT p50/p95: hits {_ms(ttft['hit']['p50'])} / {_ms(ttft['hit']['p95'])}, "
        f"misses {_ms(ttft['miss']['p50'])} / {_ms(ttft['miss']['p95'])}",
        "  routes: " + (" · ".join(f"{k} {v:,}" for k, v in m["routes"]["tiers"].items()) or "-"),
        "  guardrail blocks: " + (" · ".join(f"{k} {v:,}" for k, v in m["blocks"]["by_code"].items()) or "-"),
        f"  provider errors: {m['provider']['errors']:,}, retries: {m['provider']['retries']:,}, "
        f"coalesced followers: {m['coalesced_followers']:,}",
        "  most-hit questions: " + (", ".join(f"{q['hash']} ({q['hits']:,})" for q in m["top_questions"]) or "-"),
    ]
    if not m["available"]:
        lines.append("  (metrics could not be read from Redis: the numbers above are zeros)")
    return "\n".join(lines)


@cache_app.command("flush")
def cache_flush() -> None:
    """Delete every cached answer (only ragcache's own keys)."""
    deleted = _with_cache(lambda cache: cache.flush())
    typer.echo(f"{deleted} keys deleted")


def _with_keys(action: Callable[[KeyStore], Awaitable[T]]) -> T:
    settings = Settings()

    async def run() -> T:
        async with open_corpus(settings) as corpus:
            return await action(KeyStore(corpus.pool))

    try:
        return asyncio.run(run())
    except DATABASE_ERRORS as exc:
        err.print(f"[red]error:[/] cannot reach Postgres: {type(exc).__name__}: {exc}")
        raise typer.Exit(2) from None


def _key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "scopes": list(key.scopes),
        "rpm": key.rpm,
        "tokens_per_day": key.tokens_per_day,
        "collections": list(key.collections),
        "max_inflight": key.max_inflight,
        "created_at": key.created_at.isoformat() if key.created_at else None,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="Who or what the key is for.")],
    scope: Annotated[str, typer.Option("--scope", help="query (ask questions) or admin (also dashboard, metrics).")] = (
        "query"
    ),
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute (default: unlimited).")] = None,
    tokens_per_day: Annotated[
        int | None, typer.Option("--tokens-per-day", min=1, help="Provider tokens per UTC day (default: unlimited).")
    ] = None,
    collections: Annotated[
        str | None,
        typer.Option(
            "--collections",
            help="Collections the key may read, comma-separated; '*' for all "
            "(default: 'default' for a query key, '*' for an admin key).",
        ),
    ] = None,
    max_inflight: Annotated[
        int | None,
        typer.Option("--max-inflight", min=1, help="Answers in flight at once (default: RAG_DEFAULT_MAX_INFLIGHT)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Create a key and print it once: only its hash is stored."""
    if scope not in ("query", "admin"):
        err.print("[red]error:[/] --scope must be query or admin")
        raise typer.Exit(2)
    if not name.strip():
        err.print("[red]error:[/] --name must not be empty")
        raise typer.Exit(2)
    chosen: Scope = "admin" if scope == "admin" else "query"
    readable = _collections(collections) if collections is not None else None
    inflight = max_inflight if max_inflight is not None else Settings().default_max_inflight
    token, key = _with_keys(
        lambda keys: keys.create(
            name.strip(),
            chosen,
            rpm=rpm,
            tokens_per_day=tokens_per_day,
            collections=readable,
            max_inflight=inflight,
        )
    )
    if as_json:
        typer.echo(json.dumps({**_key_json(key), "key": token}))
        return
    typer.echo(token)
    err.print(
        f"created key [bold]{key.id}[/] ({key.name}, scopes {', '.join(key.scopes)}, "
        f"collections {','.join(key.collections)}); it is shown only once"
    )


def _collections(raw: str) -> tuple[str, ...]:
    try:
        return parse_grant(raw)
    except ValueError as exc:
        err.print(f"[red]error:[/] --collections: {exc}")
        raise typer.Exit(2) from None


KeyIdArg = Annotated[str, typer.Argument(help="The key's id (or the whole key).")]


def _key_id(given: str) -> str:
    """The id that `given` (an id, or a whole key) names."""
    parsed = parse_key(given)
    return parsed[0] if parsed else given


def _no_active_key(key_id: str) -> NoReturn:
    err.print(f"[red]error:[/] no active key with id {key_id!r}")
    raise typer.Exit(1)


@keys_app.command("update")
def keys_update(
    key_id: KeyIdArg,
    collections: Annotated[
        str | None,
        typer.Option("--collections", help="Collections the key may read, comma-separated; '*' for all."),
    ] = None,
    max_inflight: Annotated[
        int | None, typer.Option("--max-inflight", min=0, help="Answers in flight at once; 0 removes the cap.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Change an active key's settings; every running server applies it within a second (NOTIFY)."""
    fields: dict[str, object] = {}
    if collections is not None:
        fields["collections"] = list(_collections(collections))
    if max_inflight is not None:
        fields["max_inflight"] = max_inflight or None
    if not fields:
        err.print("[red]error:[/] nothing to update: give --collections or --max-inflight")
        raise typer.Exit(2)
    wanted = _key_id(key_id)
    key = _with_keys(lambda keys: keys.update(wanted, fields))
    if key is None:
        _no_active_key(wanted)
    if as_json:
        typer.echo(json.dumps(_key_json(key)))
        return
    inflight = key.max_inflight or "unlimited"
    typer.echo(f"updated {key.id}: collections {','.join(key.collections)}; max in flight {inflight}")


@keys_app.command("list")
def keys_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Keys by id and name (never the secrets, which are not stored)."""
    keys = _with_keys(lambda store: store.list(include_revoked=include_revoked))
    if as_json:
        typer.echo(json.dumps([_key_json(k) for k in keys]))
        return
    table = Table("id", "name", "scopes", "collections", "rpm", "tokens/day", "in flight", "created", "revoked")
    for k in keys:
        table.add_row(
            k.id,
            k.name,
            ",".join(k.scopes),
            ",".join(k.collections),
            str(k.rpm or "-"),
            str(k.tokens_per_day or "-"),
            str(k.max_inflight or "-"),
            k.created_at.strftime("%Y-%m-%d %H:%M") if k.created_at else "-",
            k.revoked_at.strftime("%Y-%m-%d %H:%M") if k.revoked_at else "-",
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: KeyIdArg) -> None:
    """Revoke a key; running servers stop accepting it at once."""
    wanted = _key_id(key_id)
    if not _with_keys(lambda keys: keys.revoke(wanted)):
        _no_active_key(wanted)
    typer.echo(f"revoked {wanted}")


def main() -> None:
    app()
