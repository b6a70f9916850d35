"""Per-key request rates and daily token budgets, and per-address failed-auth limits, in Redis.

Shared by every worker and replica because the counters live in Redis. Requests per minute
use GCRA (a token bucket kept as one timestamp) in a Lua script: one round trip, exact
`Retry-After`, Redis's clock for all workers. It is ~15 lines of Lua on the client the app
already has, where the `limits` library would bring its own connection handling and still
not give the fail-open behaviour wanted here.

Every check fails open: with Redis down nobody is limited (and /ready says "degraded"),
because refusing all traffic would turn a cache outage into a full outage.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.errors import BudgetExceeded, RateLimited
from service.redis.keyspace import KEYS

log = logging.getLogger(__name__)

# KEYS[1]: the key's theoretical arrival time (ms). ARGV: emission interval, period (ms).
# Allows `limit` requests at once, then one per interval. Returns 0, or ms to wait.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval, period = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - period
if now < allow_at then return allow_at - now end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now))
return 0
"""

# KEYS[1]: failures from one address in the current window. ARGV: window (s).
_COUNT_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('TTL', KEYS[1])}
"""


class Principal(Protocol):
    """What the limits know of a caller's API key (service.http.auth.Principal is one)."""

    @property
    def key_id(self) -> str: ...
    @property
    def rpm(self) -> int | None: ...
    @property
    def tokens_per_day(self) -> int | None: ...


def seconds_to_utc_midnight(now: float) -> int:
    return max(1, 86_400 - int(now) % 86_400)


def utc_day(now: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now))


def retry_after(ms: float) -> int:
    """Whole seconds to wait for `ms` milliseconds, never 0 (a client told 0 retries at once)."""
    return max(1, math.ceil(ms / 1000))


class Limiter:
    def __init__(self, client: aioredis.Redis, *, auth_failures_per_minute: int = 20) -> None:
        self.client = client
        self.auth_failures_per_minute = auth_failures_per_minute
        self._gcra = client.register_script(_GCRA)
        self._failure = client.register_script(_COUNT_FAILURE)

    # -- requests per minute ---------------------------------------------------------------
    async def check_request(self, principal: Principal) -> None:
        """`RateLimited` (`rate_limited`) when the key is over its requests per minute."""
        if principal.rpm is None:
            return
        try:
            key = KEYS.requests_per_minute(principal.key_id)
            wait_ms = int(await self._gcra(keys=[key], args=[60_000 / principal.rpm, 60_000]))
        except (RedisError, OSError) as exc:
            log.warning("rate limit not checked (fail open): %s", type(exc).__name__)
            return
        if wait_ms > 0:
            raise RateLimited(
                "rate_limited", f"this API key allows {principal.rpm} requests per minute", retry_after(wait_ms)
            )

    # -- tokens per day --------------------------------------------------------------------
    def _budget_key(self, principal: Principal, now: float) -> str:
        return KEYS.token_budget(principal.key_id, utc_day(now))

    async def check_tokens(self, principal: Principal) -> None:
        """`BudgetExceeded` once today's (UTC) provider tokens reached the key's budget."""
        if principal.tokens_per_day is None:
            return
        now = time.time()
        try:
            used = int(await self.client.get(self._budget_key(principal, now)) or 0)
        except (RedisError, OSError) as exc:
            log.warning("token budget not checked (fail open): %s", type(exc).__name__)
            return
        if used >= principal.tokens_per_day:
            raise BudgetExceeded(
                f"this API key's budget of {principal.tokens_per_day} tokens per day (UTC) is used up; "
                "cached answers are still served",
                seconds_to_utc_midnight(now),
            )

    async def charge_tokens(self, principal: Principal, tokens: int) -> None:
        if principal.tokens_per_day is None or tokens <= 0:
            return
        key = self._budget_key(principal, time.time())
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.incrby(key, tokens)
                pipe.expire(key, 2 * 86_400)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("%d tokens not charged to key %s: %s", tokens, principal.key_id, type(exc).__name__)

    # -- failed authentication per client address -----------------------------------------------
    def _failures_key(self, address: str) -> str:
        return KEYS.auth_failures(address)

    async def record_auth_failure(self, address: str) -> None:
        """Count a failed attempt; `RateLimited` (429 instead of 401) once the address is over the limit.

        Only failures are counted and only failures are refused: a valid key is never checked
        here (service/http/auth.py), so nobody can lock a user out by failing from their address.
        """
        try:
            count, ttl = await self._failure(keys=[self._failures_key(address)], args=[60])
        except (RedisError, OSError):
            return
        if int(count) > self.auth_failures_per_minute:
            raise self._blocked(int(ttl))

    def _blocked(self, ttl: int) -> RateLimited:
        return RateLimited(
            "too_many_auth_failures",
            "too many failed authentication attempts from this address; wait before retrying",
            max(1, ttl),
        )


@dataclass(frozen=True)
class TokenBudget:
    """A request's view of its key's daily budget, handed to the pipeline (which alone knows
    whether an answer is generated or served from cache)."""

    limiter: Limiter
    principal: Principal

    async def check(self) -> None:
        await self.limiter.check_tokens(self.principal)

    async def charge(self, tokens: int) -> None:
        await self.limiter.charge_tokens(self.principal, tokens)
