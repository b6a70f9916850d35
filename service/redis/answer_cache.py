"""The exact answer cache in Redis, keyed by a hash of everything that changes an answer.

Corpus state does not enter the key: instead every cached answer is registered under the
documents it was built from (`deps:<document id>`), and a corpus change deletes exactly
the answers whose documents were replaced or deleted (see `invalidation.py`). Adding an
unrelated document therefore keeps the cache warm. Answers built from no sources at all
depend on the whole corpus and are dropped on any change.

An answer is served only while every dependency set it was registered in still lists it
(checked in the same Lua script as the GET): under a memory limit with `volatile-lru`, Redis
may evict a dependency set before the answers it lists, and such an answer could then outlive
a change of its documents. Instead it is a miss (and deleted). See docs/operations.md,
"Bounded memory".

Redis is optional at run time: every operation fails soft, and after a failure the cache
stays off for a short cool-down so a dead Redis costs nothing per request (`keyspace.CoolDown`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis

from service.policy.guardrails import normalize_for_key
from service.postgres.retrieval import Filters
from service.redis.keyspace import BEST_EFFORT_ERRORS, KEYS, REDIS_ERRORS, CoolDown, Keyspace


@dataclass(frozen=True)
class KeyParts:
    question: str
    top_k: int
    filters: Filters
    model: str  # the requested model or tier ("auto" routes deterministically from the rest)
    max_tokens: int
    temperature: float
    prompt_version: str
    # The hashed permission set (service/policy/collections.py): keys that may read the same
    # collections share answers and generations; keys that may not, never do.
    permissions: str
    instructions: str = ""  # the client's system messages: answers under other instructions are not shared


def cache_key(parts: KeyParts) -> str:
    """sha256 over a canonical JSON encoding; the question is normalised (NFC, case, spaces)."""
    return digest({"q": normalize_for_key(parts.question), **_scope(parts)})


def scope_key(parts: KeyParts) -> str:
    """Everything in the key but the question: a semantic match must agree on all of it."""
    return digest(_scope(parts))


def _scope(parts: KeyParts) -> dict[str, object]:
    return {
        "k": parts.top_k,
        "f": {"source": list(parts.filters.sources)},  # collection filters are inside `p`
        "m": parts.model,
        "mt": parts.max_tokens,
        "t": round(parts.temperature, 3),
        "v": parts.prompt_version,
        "p": parts.permissions,
        **({"i": parts.instructions} if parts.instructions else {}),  # keys without instructions are unchanged
    }


def digest(fields: dict[str, object]) -> str:
    """sha256 over a canonical JSON encoding of `fields`: what every cache key here is made of."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def question_hash(question: str, key: bytes) -> str:
    """What logs, metrics, the dashboard and `matched_question_hash` show instead of the question.

    An HMAC with the server's secret (`service.hashing.hash_key`): a plain SHA-256 of a short
    question is reversed by hashing a list of likely questions, so it would leak other users'
    questions to anyone who sees the hash.
    """
    return hmac.new(key, normalize_for_key(question).encode(), hashlib.sha256).hexdigest()[:16]


@dataclass
class CachedAnswer:
    answer: str
    route: dict[str, Any]
    sources: list[dict[str, Any]]
    usage: dict[str, Any]
    document_ids: list[int]
    question_hash: str
    created_at: float = field(default_factory=time.time)

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes) -> CachedAnswer:
        return cls(**json.loads(raw))


# KEYS[1]: the answer; ARGV[1]: its cache key (a member of its dependency sets), ARGV[2]: the
# dependency sets' key prefix. The answer, or nil when any of its sets no longer lists it.
_GET_LISTED = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local ok, entry = pcall(cjson.decode, raw)
if not ok or type(entry) ~= 'table' then return raw end
local ids = entry['document_ids']
if type(ids) ~= 'table' or #ids == 0 then ids = {'none'} end
for _, id in ipairs(ids) do
  if redis.call('SISMEMBER', ARGV[2] .. tostring(id), ARGV[1]) == 0 then
    redis.call('DEL', KEYS[1])
    return false
  end
end
return raw
"""


class AnswerCache:
    def __init__(self, client: aioredis.Redis, *, ttl_s: int, keys: Keyspace = KEYS) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.keys = keys
        self._cool_down = CoolDown("cache off")
        self._get_listed = client.register_script(_GET_LISTED)

    @property
    def available(self) -> bool:
        return self._cool_down.available

    def _failed(self, op: str, exc: BaseException) -> None:
        self._cool_down.failed(op, exc)

    # -- operations -------------------------------------------------------------------
    async def get(self, key: str) -> CachedAnswer | None:
        if not self.available:
            return None
        try:
            raw = await self._get_listed(keys=[self.keys.answer(key)], args=[key, self.keys.deps_prefix])
        except REDIS_ERRORS as exc:
            self._failed("get", exc)
            return None
        if raw is None:
            return None
        try:
            return CachedAnswer.loads(raw if isinstance(raw, bytes) else raw.encode())
        except (ValueError, TypeError):  # written by an incompatible version: treat as a miss
            return None

    async def put(self, key: str, entry: CachedAnswer) -> bool:
        if not self.available:
            return False
        deps = [self.keys.deps(d) for d in entry.document_ids] or [self.keys.deps(None)]
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.keys.answer(key), entry.dumps(), ex=self.ttl_s)
                for dep in deps:
                    pipe.sadd(dep, key)
                    pipe.expire(dep, self.ttl_s)
                await pipe.execute()
        except BEST_EFFORT_ERRORS as exc:  # a busy pool too: the answer goes uncached, the cache stays on
            self._failed("put", exc)
            return False
        return True

    async def delete(self, key: str) -> None:
        try:
            await self.client.delete(self.keys.answer(key))
        except BEST_EFFORT_ERRORS as exc:
            self._failed("delete", exc)

    async def invalidate(self, document_ids: Iterable[int | None]) -> int:
        """Drop every answer built from these documents (None: answers built from no source).

        Raises on Redis errors: the caller must retry later rather than forget the change.
        """
        deps = [self.keys.deps(d) for d in document_ids]
        if not deps:
            return 0
        async with self.client.pipeline(transaction=False) as pipe:
            for dep in deps:
                pipe.smembers(dep)
            members: Sequence[set[bytes]] = await pipe.execute()
        keys = {m.decode() for group in members for m in group}
        async with self.client.pipeline(transaction=True) as pipe:
            for key in keys:
                pipe.delete(self.keys.answer(key))
            pipe.delete(*deps)
            await pipe.execute()
        return len(keys)

    async def flush(self) -> int:
        """Delete every key of the families the keyspace assigns to the cache: answers, dependency
        sets, the corpus marker, coalescing state.

        Nothing else in the Redis database is touched; the metrics history and the keys'
        rate limits and token budgets are kept (a flush must not hand out fresh budgets).
        """
        deleted = 0
        for pattern in self.keys.flushed_by_answer_cache:
            async for batch in _batched(self.client.scan_iter(match=pattern, count=500), 500):
                deleted += await self.client.delete(*batch)
        return deleted

    async def stats(self) -> Mapping[str, int]:
        answers = 0
        async for _ in self.client.scan_iter(match=self.keys.family("answer"), count=1000):
            answers += 1
        return {"answers": answers}


async def _batched(items: Any, size: int) -> Any:
    batch: list[Any] = []
    async for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
