"""Per-key request rates, daily token budgets and misses in flight, and per-address failed-auth
limits, in Redis.

Shared by every worker and replica because the counters live in Redis. Requests per minute
use GCRA (a token bucket kept as one timestamp) in a Lua script: one round trip, exact
`Retry-After`, Redis's clock for all workers. It is ~15 lines of Lua on the client the app
already has, where the `limits` library would bring its own connection handling and still
not give the fail-open behaviour wanted here.

Token budgets are reserved, not charged after the fact: before generating, one Lua script
checks and reserves the prompt's tokens plus `max_tokens`; the answer's producer then settles the
reservation to what was really generated (never more), whatever way the answer ends. So the
tokens charged to a key in a UTC day never exceed its budget, under any concurrency.

No limit's key carries a TTL: Redis runs bounded under `volatile-lru`, which evicts only keys with
a TTL, so cached answers make room and a limit's count is never evicted (an evicted budget would
read as nothing spent: the cap would fail open without a word). Each key is instead kept small
and bounded by its writer: one requests-per-minute timestamp, one budget hash (the current UTC
day and its tokens, reset by the first reservation of a new day) and at most one in-flight set
(emptied by releases and lapses) per API key, and one hash of failed authentications for the
current minute (dropped by the first failure of a later one). See docs/operations.md, "Bounded memory".

Every check fails open: with Redis down nobody is limited (and /ready says "degraded"),
because refusing all traffic would turn a cache outage into a full outage; after a failure the
checks are skipped for the cool-down (`keyspace.CoolDown`), so a hung Redis costs no waits. A busy pool is not
Redis down: the limiter has its own pool (service/redis/client.py), and when even that one has
no connection free in time, `PoolExhausted` goes up as a 503 `overloaded` (never fail open).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.errors import BudgetExceeded, RateLimited, ServiceError
from service.redis.keyspace import KEYS, REDIS_ERRORS, CoolDown

log = logging.getLogger(__name__)

# KEYS[1]: the key's theoretical arrival time (ms). ARGV: emission interval, period (ms).
# Allows `limit` requests at once, then one per interval. Returns 0, or ms to wait.
# No TTL (see above): a stale arrival time is in the past and counts as none.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval, period = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - period
if now < allow_at then return allow_at - now end
redis.call('SET', KEYS[1], new_tat)
return 0
"""

# A key's tokens used in the current UTC day: KEYS[1] is its budget hash (`day`: YYYYMMDD,
# `used`), ARGV[1] the caller's day. Leaves in the locals `day` and `used` the day charged and its
# count so far: the stored day when it is not older than the caller's (a worker whose clock is a
# little behind at midnight charges the day already begun instead of resetting it), else the
# caller's new day, from what KEYS[2] says (that day's counter as versions before the hash kept
# it: a string with a TTL, gone within two days of an upgrade, nil after that).
_TODAY = """
local day = tonumber(ARGV[1])
local stored = tonumber(redis.call('HGET', KEYS[1], 'day') or '0')
local used
if stored >= day then
  day = stored
  used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
else
  used = tonumber(redis.call('GET', KEYS[2]) or '0')
end
"""

# Today's tokens used (a read: nothing is written). Returns them.
_USED = _TODAY + "return used\n"

# ARGV[2]: tokens to reserve, ARGV[3]: the budget. Reserves all or nothing: returns the day
# reserved on (YYYYMMDD), or 0 when the tokens are not all left. The hash has no TTL: a new day
# overwrites the old one's count, so a key never holds more than this one hash.
_RESERVE = (
    _TODAY
    + """
local want = tonumber(ARGV[2])
if used + want > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'day', day, 'used', used + want)
return day
"""
)

# KEYS[1]: the key's budget hash. ARGV: the day a reservation was made on, the change to its
# count. A day that is over (the hash moved on) is left alone; a charge with nothing reserved
# (Redis was away at reservation time) may start the day.
_SETTLE = """
local stored = redis.call('HGET', KEYS[1], 'day')
if stored == ARGV[1] then return redis.call('HINCRBY', KEYS[1], 'used', ARGV[2]) end
local delta = tonumber(ARGV[2])
if delta > 0 and tonumber(stored or '0') < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'day', ARGV[1], 'used', delta)
end
return 0
"""

# KEYS[1]: the key's slots in flight (sorted set, score: when a slot lapses, ms).
# ARGV: this request's slot, the cap, the lapse (ms). Returns 1 if the slot is taken, else 0.
_OCCUPY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS[1]: failed authentications per address in the current window (a hash; field `#window`:
# the window's number, by Redis's clock). ARGV: the address, the window (s). The first failure of
# a new window drops the last one's counts (the hash has no TTL). Returns {this address's
# failures in the window, seconds left in it}.
_COUNT_FAILURE = """
local now = tonumber(redis.call('TIME')[1])
local length = tonumber(ARGV[2])
local window = math.floor(now / length)
if tonumber(redis.call('HGET', KEYS[1], '#window') or '-1') ~= window then
  redis.call('UNLINK', KEYS[1])
  redis.call('HSET', KEYS[1], '#window', window)
end
return {redis.call('HINCRBY', KEYS[1], ARGV[1], 1), (window + 1) * length - now}
"""


class Principal(Protocol):
    """What the limits know of a caller's API key (service.http.auth.Principal is one)."""

    @property
    def key_id(self) -> str: ...
    @property
    def rpm(self) -> int | None: ...
    @property
    def tokens_per_day(self) -> int | None: ...
    @property
    def max_inflight(self) -> int | None: ...


def seconds_to_utc_midnight(now: float) -> int:
    return max(1, 86_400 - int(now) % 86_400)


def utc_day(now: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now))


def retry_after(ms: float) -> int:
    """Whole seconds to wait for `ms` milliseconds, never 0 (a client told 0 retries at once)."""
    return max(1, math.ceil(ms / 1000))


class Limiter:
    def __init__(
        self, client: aioredis.Redis, *, auth_failures_per_minute: int = 20, inflight_lapse_s: float = 150.0
    ) -> None:
        self.client = client  # the worker's limits pool, apart from the request pool
        self.auth_failures_per_minute = auth_failures_per_minute
        # A slot left by a crashed worker lapses after this long (the longest answer, plus margin).
        self.inflight_lapse_ms = int(inflight_lapse_s * 1000)
        self._gcra = client.register_script(_GCRA)
        self._failure = client.register_script(_COUNT_FAILURE)
        self._used = client.register_script(_USED)
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._occupy = client.register_script(_OCCUPY)
        # After Redis failed (not a busy pool: see keyspace), checks fail open at once for a short
        # while instead of each waiting for a timeout on a hung server and piling up on the pool.
        self._cool_down = CoolDown("limits fail open", log)

    @property
    def enforcing(self) -> bool:
        return self._cool_down.available

    def _fail_open(self, what: str, exc: BaseException) -> None:
        self._cool_down.failed(f"{what} not checked", exc)  # its one warning line per outage

    # -- requests per minute ---------------------------------------------------------------
    async def check_request(self, principal: Principal) -> None:
        """`RateLimited` (`rate_limited`) when the key is over its requests per minute."""
        if principal.rpm is None or not self.enforcing:
            return
        try:
            key = KEYS.requests_per_minute(principal.key_id)
            wait_ms = int(await self._gcra(keys=[key], args=[60_000 / principal.rpm, 60_000]))
        except REDIS_ERRORS as exc:
            self._fail_open("rate limit", exc)
            return
        if wait_ms > 0:
            raise RateLimited(
                "rate_limited", f"this API key allows {principal.rpm} requests per minute", retry_after(wait_ms)
            )

    # -- tokens per day --------------------------------------------------------------------
    @staticmethod
    def _budget_keys(principal: Principal, day: str) -> list[str]:
        """The key's budget hash, and the day's counter as it was kept before (read when a day starts)."""
        return [KEYS.token_budget(principal.key_id), KEYS.token_budget_by_day(principal.key_id, day)]

    async def check_tokens(self, principal: Principal, *, now: float | None = None) -> None:
        """`BudgetExceeded` once today's (UTC) provider tokens reached the key's budget (a cheap early look)."""
        if principal.tokens_per_day is None or not self.enforcing:
            return
        now = time.time() if now is None else now
        day = utc_day(now)
        try:
            used = int(await self._used(keys=self._budget_keys(principal, day), args=[day]))
        except REDIS_ERRORS as exc:
            self._fail_open("token budget", exc)
            return
        if used >= principal.tokens_per_day:
            raise _used_up(principal.tokens_per_day, now)

    async def reserve_tokens(self, principal: Principal, tokens: int, *, now: float | None = None) -> Reservation:
        """Reserve `tokens` of today's budget at once, or `BudgetExceeded` if they are not all left."""
        now = time.time() if now is None else now
        day = utc_day(now)
        keys = self._budget_keys(principal, day)
        if principal.tokens_per_day is None:
            return Reservation(self, principal.key_id, keys[0], day, 0, metered=False)
        if not self.enforcing:
            return Reservation(self, principal.key_id, keys[0], day, 0)  # settles to what is spent, uncapped
        try:
            reserved_on = int(await self._reserve(keys=keys, args=[day, tokens, principal.tokens_per_day]))
        except REDIS_ERRORS as exc:
            self._fail_open("token budget", exc)
            return Reservation(self, principal.key_id, keys[0], day, 0)
        if not reserved_on:
            raise _used_up(principal.tokens_per_day, now, wanted=tokens)
        return Reservation(self, principal.key_id, keys[0], str(reserved_on), tokens)

    async def adjust_tokens(self, key: str, day: str, delta: int) -> None:
        """Move a day's count by `delta` (a settled reservation gives back what it did not use); a day
        that is over is left alone."""
        await self._settle(keys=[key], args=[day, delta])

    # -- misses in flight ------------------------------------------------------------------
    async def occupy_slot(self, principal: Principal, slot: str) -> bool:
        """Take one of the key's in-flight slots; `RateLimited` (`too_many_inflight`) if all are taken.

        False when nothing was taken (no cap on this key). A Redis error is not checked (fail open)
        but returns True: the script may have run and only its reply been lost, so the caller gives
        the slot back as if it held it (a ZREM of nothing is harmless).
        """
        if principal.max_inflight is None or not self.enforcing:
            return False
        try:
            key = KEYS.inflight_slots(principal.key_id)
            taken = await self._occupy(keys=[key], args=[slot, principal.max_inflight, self.inflight_lapse_ms])
        except REDIS_ERRORS as exc:  # not checked (fail open); the script may still have run,
            self._fail_open("in-flight cap", exc)  # its reply lost: the caller gives the slot back anyway
            return True
        if not int(taken):
            raise RateLimited(
                "too_many_inflight",
                f"this API key allows {principal.max_inflight} answers in flight at once; retry when one has finished",
                1,
            )
        return True

    async def release_slot(self, principal: Principal, slot: str) -> None:
        try:
            await self.client.zrem(KEYS.inflight_slots(principal.key_id), slot)
        except (RedisError, OSError, ServiceError) as exc:  # it lapses on its own
            log.warning("in-flight slot not released: %s", type(exc).__name__)

    # -- failed authentication per client address -----------------------------------------------
    async def record_auth_failure(self, address: str) -> None:
        """Count a failed attempt; `RateLimited` (429 instead of 401) once the address is over the limit.

        Only failures are counted and only failures are refused: a valid key is never checked
        here (service/http/auth.py), so nobody can lock a user out by failing from their address.
        """
        try:
            count, ttl = await self._failure(keys=[KEYS.auth_failures], args=[address, 60])
        except REDIS_ERRORS:
            return
        if int(count) > self.auth_failures_per_minute:
            raise self._blocked(int(ttl))

    def _blocked(self, ttl: int) -> RateLimited:
        return RateLimited(
            "too_many_auth_failures",
            "too many failed authentication attempts from this address; wait before retrying",
            max(1, ttl),
        )


def settled_charge(spent: int, reserved: int) -> int:
    """What a generation is charged: what it spent, capped at its reservation (0: nothing could be
    reserved because Redis was away, so the spend is charged as it is)."""
    spent = max(0, spent)
    return min(spent, reserved) if reserved > 0 else spent


def _used_up(budget: int, now: float, *, wanted: int | None = None) -> BudgetExceeded:
    need = f" ({wanted} would be reserved for this answer: its prompt plus max_tokens)" if wanted else ""
    return BudgetExceeded(
        f"this API key's budget of {budget} tokens per day (UTC) is used up{need}; cached answers are still served",
        seconds_to_utc_midnight(now),
    )


@dataclass
class Reservation:
    """Tokens held from a key's daily budget for one generation, until `settle` says what it cost."""

    limiter: Limiter
    key_id: str
    budget_key: str  # the key's budget hash
    day: str  # the UTC day it was reserved on (YYYYMMDD; an answer may cross midnight)
    reserved: int
    metered: bool = True  # False: the key has no budget, nothing to settle
    settled: bool = False

    async def settle(self, spent: int) -> None:
        """Charge what was spent, never more than was reserved (unless nothing could be); once."""
        if self.settled or not self.metered:
            return
        self.settled = True
        charged = settled_charge(spent, self.reserved)
        if charged == self.reserved:
            return
        try:
            await self.limiter.adjust_tokens(self.budget_key, self.day, charged - self.reserved)
        except (RedisError, OSError, ServiceError) as exc:
            log.warning("token reservation of key %s not settled: %s", self.key_id, type(exc).__name__)


@dataclass
class TokenBudget:
    """A request's view of its key's daily token budget and in-flight cap, handed to the pipeline
    (which alone knows whether an answer is generated or served from cache)."""

    limiter: Limiter
    principal: Principal
    _slot: str | None = field(default=None, init=False)

    async def check(self) -> None:
        await self.limiter.check_tokens(self.principal)

    async def reserve(self, tokens: int) -> Reservation:
        return await self.limiter.reserve_tokens(self.principal, tokens)

    async def occupy(self) -> None:
        """Count this request among its key's misses in flight (once); `RateLimited` over the cap."""
        if self._slot is None:
            # Recorded before the call: a request cancelled while the script runs (or its reply is on
            # the way) still vacates the slot it may hold; a refusal, or nothing taken, forgets it.
            self._slot = slot = uuid.uuid4().hex
            try:
                taken = await self.limiter.occupy_slot(self.principal, slot)
            except ServiceError:
                self._slot = None
                raise
            if not taken:
                self._slot = None

    @property
    def occupied(self) -> bool:
        """Whether this request holds one of its key's in-flight slots (a hit never does)."""
        return self._slot is not None

    async def vacate(self) -> None:
        if self._slot is not None:
            slot, self._slot = self._slot, None
            await self.limiter.release_slot(self.principal, slot)
