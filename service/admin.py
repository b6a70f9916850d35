"""`rag-admin`: operator commands (cache now; API keys arrive with authentication)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import redis.asyncio as aioredis
import typer
from redis.exceptions import RedisError
from rich.console import Console

from service.app import redis_url
from service.cache import AnswerCache
from service.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Administer ragcache.")
cache_app = typer.Typer(no_args_is_help=True, help="The answer cache.")
app.add_typer(cache_app, name="cache")
err = Console(stderr=True)

T = TypeVar("T")


def _with_cache(action: Callable[[AnswerCache], Awaitable[T]]) -> T:
    settings = Settings()

    async def run() -> T:
        url, _server = redis_url(settings)
        client = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            return await action(AnswerCache(client, ttl_s=settings.cache_ttl_s))
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    except (RedisError, OSError) as exc:
        err.print(f"[red]error:[/] cannot reach Redis: {type(exc).__name__}: {exc}")
        raise typer.Exit(2) from None


@cache_app.command("stats")
def cache_stats(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """How many answers are cached."""
    stats: dict[str, Any] = dict(_with_cache(lambda cache: cache.stats()))
    if as_json:
        typer.echo(json.dumps(stats))
    else:
        for key, value in stats.items():
            typer.echo(f"{key}: {value}")


@cache_app.command("flush")
def cache_flush() -> None:
    """Delete every cached answer (only ragcache's own keys)."""
    deleted = _with_cache(lambda cache: cache.flush())
    typer.echo(f"{deleted} keys deleted")


def main() -> None:
    app()
