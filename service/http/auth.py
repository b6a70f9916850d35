"""API keys: creation, look-up, and the FastAPI dependency that guards every endpoint.

A key reads `rck_<id>_<secret>`. The id is public (it names the key in logs, limits and
`rag-admin keys list`); only a SHA-256 of the secret is stored, and it is compared in
constant time. Keys carry 256 random bits, so a slow password hash would buy nothing.

Look-ups are cached in-process for a few seconds so a cache hit needs no SQL. Revocation
reaches running servers at once through NOTIFY, and within the cache TTL if that is missed.
When Postgres is down, keys seen before stay valid (stale entries are kept) so cached
answers are still served; an unknown key then gets 503, not 401.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from service.errors import AuthUnavailable
from service.http.errors import APIError
from service.http.proxies import throttle_address
from service.policy.collections import ALL, DEFAULT, parse_grant
from service.postgres.db import DATABASE_ERRORS

log = logging.getLogger(__name__)

Scope = Literal["query", "admin"]
SCOPES: dict[Scope, tuple[str, ...]] = {"query": ("query",), "admin": ("query", "admin")}
KEYS_CHANNEL = "ragcache_keys"  # NOTIFY payload: the id of a revoked or updated key
PREFIX = "rck"
_KEY = re.compile(rf"{PREFIX}_([a-z0-9]{{12}})_([A-Za-z0-9_-]{{43}})")
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    secret_sha256: bytes
    scopes: tuple[str, ...]
    rpm: int | None
    tokens_per_day: int | None
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    collections: tuple[str, ...] = (DEFAULT,)  # what it may read; ("*",) for every collection
    max_inflight: int | None = None  # misses in flight at once; None: no cap


@dataclass(frozen=True)
class Principal:
    """Who is calling: what limits, logs and metrics know of a request's key."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    rpm: int | None
    tokens_per_day: int | None
    collections: tuple[str, ...] = (DEFAULT,)
    max_inflight: int | None = None


# --- pure ---------------------------------------------------------------------------------


def new_key() -> tuple[str, str, bytes]:
    """A fresh key: (the full key to show once, its id, the digest to store)."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    secret = secrets.token_urlsafe(32)
    return f"{PREFIX}_{key_id}_{secret}", key_id, digest(secret)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_key(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, or None."""
    match = _KEY.fullmatch(token)
    return (match[1], match[2]) if match else None


def verify(key: ApiKey | None, secret: str) -> bool:
    # Compare even when the key is unknown, so timing does not tell which ids exist.
    stored = key.secret_sha256 if key is not None else b"\0" * 32
    return hmac.compare_digest(stored, digest(secret)) and key is not None and key.revoked_at is None


# --- Postgres -----------------------------------------------------------------------------


def _collections_value(value: object) -> list[str]:
    if not isinstance(value, str | list | tuple):
        raise ValueError("collections must be a list of names or '*'")
    return list(parse_grant(value if isinstance(value, str) else [str(v) for v in value]))


def _max_inflight_value(value: object) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError("max_inflight must be a positive number, or None for no cap")


# The columns `KeyStore.update` may set, each with the check that turns a value into a column value.
_UPDATABLE: dict[str, Callable[[object], object]] = {
    "collections": _collections_value,
    "max_inflight": _max_inflight_value,
}


def _row(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        secret_sha256=bytes(row["secret_sha256"]),
        scopes=tuple(row["scopes"]),
        rpm=row["rpm"],
        tokens_per_day=row["tokens_per_day"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        collections=tuple(row["collections"]),
        max_inflight=row["max_inflight"],
    )


class KeyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(
        self,
        name: str,
        scope: Scope = "query",
        *,
        rpm: int | None = None,
        tokens_per_day: int | None = None,
        collections: Sequence[str] | None = None,
        max_inflight: int | None = None,
    ) -> tuple[str, ApiKey]:
        """Store a new key; returns the full key, which exists nowhere else afterwards.

        `collections` defaults to `default` for a query key and `*` (all) for an admin key.
        """
        token, key_id, secret_hash = new_key()
        readable = parse_grant(collections if collections is not None else (ALL if scope == "admin" else DEFAULT))
        row = await self.pool.fetchrow(
            """INSERT INTO api_keys (id, name, secret_sha256, scopes, rpm, tokens_per_day, collections, max_inflight)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *""",
            key_id,
            name,
            secret_hash,
            list(SCOPES[scope]),
            rpm,
            tokens_per_day,
            list(readable),
            max_inflight,
        )
        assert row is not None
        return token, _row(row)

    async def get(self, key_id: str) -> ApiKey | None:
        row = await self.pool.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
        return _row(row) if row is not None else None

    async def list(self, *, include_revoked: bool = False) -> Sequence[ApiKey]:
        rows = await self.pool.fetch(
            "SELECT * FROM api_keys WHERE $1 OR revoked_at IS NULL ORDER BY created_at, id", include_revoked
        )
        return [_row(r) for r in rows]

    async def update(self, key_id: str, fields: Mapping[str, object]) -> ApiKey | None:
        """Change an active key's settings (`collections`, …); every worker rereads it via NOTIFY.

        Returns the updated key, or None if no active key has this id. Raises ValueError for an
        unknown field or a bad value.
        """
        if not fields:
            raise ValueError("nothing to update")
        unknown = set(fields) - set(_UPDATABLE)
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)[0]!r}")
        values = {name: _UPDATABLE[name](value) for name, value in fields.items()}
        assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(values, start=2))
        row = await self._update_active(key_id, assignments, *values.values())
        return _row(row) if row is not None else None

    async def revoke(self, key_id: str) -> bool:
        """True if the key existed and was active; running servers forget it via NOTIFY."""
        return await self._update_active(key_id, "revoked_at = now()") is not None

    async def _update_active(self, key_id: str, assignments: str, *values: object) -> asyncpg.Record | None:
        """`SET assignments` (parameters $2, … are `values`) on the active key `key_id`, and in the same
        transaction NOTIFY every worker, which drops the key and rereads it; its new row, or None."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE api_keys SET {assignments} WHERE id = $1 AND revoked_at IS NULL RETURNING *",  # noqa: S608 our own assignments
                key_id,
                *values,
            )
            if row is not None:
                await conn.execute("SELECT pg_notify($1, $2)", KEYS_CHANNEL, key_id)
        return row


# --- the in-process view ------------------------------------------------------------------


class Authenticator:
    """Key look-up with a short in-process cache, so authenticated cache hits cost no SQL."""

    def __init__(
        self,
        lookup: Callable[[str], Awaitable[ApiKey | None]],
        *,
        ttl_s: float = 10.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lookup = lookup
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, ApiKey | None]] = OrderedDict()

    async def authenticate(self, token: str) -> Principal | None:
        """The principal for a valid, unrevoked key; None for anything else."""
        parsed = parse_key(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        key = await self._key(key_id)
        if not verify(key, secret):
            return None
        assert key is not None
        return Principal(key.id, key.name, key.scopes, key.rpm, key.tokens_per_day, key.collections, key.max_inflight)

    def forget(self, key_id: str) -> None:
        self._entries.pop(key_id, None)

    async def _key(self, key_id: str) -> ApiKey | None:
        now = self.clock()
        cached = self._entries.get(key_id)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        try:
            key = await self.lookup(key_id)
        except DATABASE_ERRORS as exc:
            if cached is not None:  # stale beats unavailable: cached answers keep flowing
                return cached[1]
            raise AuthUnavailable(type(exc).__name__) from exc
        self._entries[key_id] = (now, key)
        self._entries.move_to_end(key_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return key


# --- FastAPI ------------------------------------------------------------------------------

bearer = HTTPBearer(auto_error=False, description="An API key from `rag-admin keys create`.")


def unauthorized(message: str) -> APIError:
    return APIError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def requires(scope: Scope) -> Callable[[Request, HTTPAuthorizationCredentials | None], Awaitable[Principal]]:
    """A dependency: the caller's principal, or 401 (no or bad key) / 403 (key lacks `scope`).

    Failed attempts are counted per client address (`throttle_address`: the peer, or what a
    proxy in RAG_TRUSTED_PROXIES reports; an IPv6 /64 counts as one), and only failed ones: once
    an address is over the limit its failures get 429 instead of 401, but a valid key from it
    is always let in, so an attacker sharing a NAT or proxy with a user cannot lock the user out.
    Every key is looked up (one primary-key probe); 256-bit keys make guessing hopeless anyway,
    and the limit is what keeps a flood of tries slow and visible.
    """

    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
    ) -> Principal:
        resources = request.app.state.resources
        limiter = resources.limiter
        auth: Authenticator = resources.auth
        address = throttle_address(request.client.host if request.client else None)
        principal: Principal | None = None
        if credentials is not None:
            principal = await auth.authenticate(credentials.credentials)  # AuthUnavailable: 503
        if principal is None:
            await limiter.record_auth_failure(address)  # 429 instead, once over the limit
            if credentials is None:
                raise unauthorized("missing API key: send `Authorization: Bearer <key>`")
            raise unauthorized("unknown or revoked API key")
        if scope not in principal.scopes:
            raise APIError(403, "forbidden", f"this API key lacks the {scope!r} scope")
        request.state.principal = principal
        return principal

    _GUARDS.add(dependency)
    return dependency


_GUARDS: set[Callable[..., Awaitable[Principal]]] = set()  # every dependency `requires` made


class AuthFirstRoute(APIRoute):
    """A route that checks the key before it lets the caller hear about the body.

    FastAPI reads and decodes a JSON body before it runs any dependency, so without this a
    caller with no key would get 422 for malformed JSON (or 400 for undecodable bytes) where
    every other request of theirs gets 401. On such an error, the route's `requires(...)`
    runs first and its 401/403/429 wins.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        guards = [d.dependency for d in self.dependencies if d.dependency in _GUARDS]

        async def authenticated_first(request: Request) -> Response:
            try:
                return await handler(request)
            except (RequestValidationError, HTTPException):
                if guards and getattr(request.state, "principal", None) is None:
                    credentials = await bearer(request)
                    for guard in guards:
                        await guard(request, credentials)
                raise

        return authenticated_first
