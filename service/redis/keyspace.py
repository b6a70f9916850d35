"""Every Redis key this service writes, and the one fail-soft policy for Redis errors.

All keys live under one prefix (`ragcache:`), split into families:

- `answer:`, `deps:`: the exact answer cache (an answer, and the answers built from a document);
- `corpus:`: the corpus watcher's marker (the corpus version the cache has caught up with);
- `rewrite:`: standalone questions of follow-ups, by a hash of the recent user turns and the question;
- `verdict:`: the small tier's yes/no on a semantic candidate, by the cached entry and the new wording;
- `inflight:`, `stream:`, `followers:`: coalescing leases, event streams and follower counts;
- `limit:`: rate limits, token budgets, in-flight slots and failed-auth counters, all without a
  TTL so that Redis's `volatile-lru` never evicts them (their writers keep them bounded: see
  service/redis/limits.py);
- `metrics:`: the dashboard's per-minute series.

`rag-admin cache flush` deletes the groups above `limit:` (`CACHE_FAMILIES`) and keeps limits (a
flush must not hand out fresh budgets) and the metrics history (`KEPT_FAMILIES`).

Redis is optional at run time: after a failure, the callers that can do without it skip it for
`COOL_DOWN_S` (see `CoolDown`), so a dead Redis costs nothing per request.

A worker's own pool being busy is not Redis being down. Its pools raise the domain error
`PoolExhausted` (service/redis/client.py), which is deliberately not among `REDIS_ERRORS`: on the
request path nobody catches it, so the request ends in 503 `overloaded` with `Retry-After: 1`
instead of failing open (limits), skipping the cache or answering alone (coalescing); work off
the request path (metrics, lease renewals) catches `BEST_EFFORT_ERRORS` and retries later; and
`CoolDown` ignores it, so a busy pool never switches the cache off for everyone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from service.errors import PoolExhausted

PREFIX = "ragcache"
COOL_DOWN_S = 2.0
# What a Redis call raises when the server is away: redis-py's own errors, a refused or reset
# socket, and a timed-out read.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
# What work off the request path gives up on for now: Redis away, or this worker's pool busy.
BEST_EFFORT_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, PoolExhausted)

CACHE_FAMILIES = ("answer", "deps", "corpus", "rewrite", "verdict", "inflight", "stream", "followers")
KEPT_FAMILIES = ("limit", "metrics")


@dataclass(frozen=True)
class Keyspace:
    """Key builders for every family; one instance (`KEYS`) unless a test wants another prefix."""

    prefix: str = PREFIX

    def family(self, name: str) -> str:
        """The match pattern of every key of one family (for SCAN)."""
        return f"{self.prefix}:{name}:*"

    @property
    def flushed_by_answer_cache(self) -> tuple[str, ...]:
        """Match patterns of the families an answer-cache flush deletes (everything but limits and metrics)."""
        return tuple(self.family(name) for name in CACHE_FAMILIES)

    # -- the exact answer cache --------------------------------------------------------------
    def answer(self, key: str) -> str:
        return f"{self.prefix}:answer:{key}"

    def deps(self, document_id: int | None) -> str:
        """The set of answer keys built from one document (None: answers built from no source)."""
        return f"{self.deps_prefix}{'none' if document_id is None else document_id}"

    @property
    def deps_prefix(self) -> str:
        return f"{self.prefix}:deps:"

    @property
    def corpus_version(self) -> str:
        """The corpus version whose changes the cache has applied (the stored name predates the rename)."""
        return f"{self.prefix}:corpus:generation"

    # -- follow-up rewrites -------------------------------------------------------------------
    def rewrite(self, key: str) -> str:
        """The standalone question of one follow-up (`key`: a hash of the recent user turns and the question)."""
        return f"{self.prefix}:rewrite:{key}"

    # -- semantic verification ----------------------------------------------------------------
    def verdict(self, entry: str, wording: str) -> str:
        """The small tier's verdict on serving the answer under key `entry` to a question (`wording`: its digest)."""
        return f"{self.prefix}:verdict:{entry}:{wording}"

    # -- coalescing ---------------------------------------------------------------------------
    def lease(self, key: str) -> str:
        return f"{self.prefix}:inflight:{key}"

    def stream(self, key: str) -> str:
        return f"{self.prefix}:stream:{key}"

    def followers(self, key: str) -> str:
        return f"{self.prefix}:followers:{key}"

    # -- limits -------------------------------------------------------------------------------
    def requests_per_minute(self, key_id: str) -> str:
        return f"{self.prefix}:limit:rpm:{key_id}"

    def token_budget(self, key_id: str) -> str:
        """A hash of the key's tokens used in the current UTC day: `day` (YYYYMMDD) and `used`."""
        return f"{self.prefix}:limit:tokens:{key_id}"

    def token_budget_by_day(self, key_id: str, day: str) -> str:
        """The day's counter as versions before `token_budget` kept it (with a TTL: gone two days after
        an upgrade). Read once when the hash starts that day, so an upgrade does not reset a budget."""
        return f"{self.prefix}:limit:tokens:{key_id}:{day}"

    def inflight_slots(self, key_id: str) -> str:
        """A sorted set of the key's misses in flight (member: a request's slot, score: when it lapses)."""
        return f"{self.prefix}:limit:inflight:{key_id}"

    @property
    def auth_failures(self) -> str:
        """A hash of failed authentications per client address in the current minute (one key for all)."""
        return f"{self.prefix}:limit:authfail"

    # -- the dashboard's series ----------------------------------------------------------------
    def metrics_minute(self, minute: int) -> str:
        return f"{self.prefix}:metrics:m:{minute}"

    def metrics_hour(self, hour: int) -> str:
        return f"{self.prefix}:metrics:h:{hour}"

    def metrics_top(self, hour: int) -> str:
        """Most-hit question hashes of one hour (a sorted set)."""
        return f"{self.prefix}:metrics:q:{hour}"

    def metrics_scratch(self, token: str) -> str:
        """A short-lived key a read aggregates into."""
        return f"{self.prefix}:metrics:tmp:{token}"


KEYS = Keyspace()


@dataclass
class CoolDown:
    """The fail-soft policy shared by Redis callers that can do without Redis.

    After a failure, `available` is False for `COOL_DOWN_S` seconds: callers skip Redis (a miss,
    a buffered write) instead of waiting for a timeout on every request. One warning per outage.
    """

    what: str  # what is switched off, for the log line ("cache off", "metrics series paused")
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__))
    _down_until: float = 0.0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, op: str, exc: BaseException) -> None:
        if isinstance(exc, PoolExhausted):  # this worker is busy; Redis is fine
            return
        cool_down_s = COOL_DOWN_S  # read at failure time so a test can shorten it
        if self.available:
            self.logger.warning(
                "redis unavailable, %s for %.0fs (%s: %s)", self.what, cool_down_s, op, type(exc).__name__
            )
        self._down_until = time.monotonic() + cool_down_s
