"""The rewrite cache: the standalone question of a follow-up, so a replayed conversation costs no model call.

Keyed by a hash of the recent user turns and the question (normalised like the answer cache's
key), under the keyspace's `rewrite:` family, which `rag-admin cache flush` deletes with the
answers. Fail-soft like the answer cache: without Redis every follow-up is simply rewritten again.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from service.policy.guardrails import normalize_for_key
from service.redis.answer_cache import digest
from service.redis.keyspace import BEST_EFFORT_ERRORS, KEYS, CoolDown, Keyspace


def rewrite_key(user_turns: Sequence[str], question: str, model: str) -> str:
    """sha256 over the turns, the question (both normalised) and the model that rewrote them."""
    return digest({"t": [normalize_for_key(t) for t in user_turns], "q": normalize_for_key(question), "m": model})


class RewriteCache:
    def __init__(self, client: aioredis.Redis, *, ttl_s: int, keys: Keyspace = KEYS) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.keys = keys
        self._cool_down = CoolDown("rewrite cache off")

    async def get(self, key: str) -> str | None:
        if not self._cool_down.available:
            return None
        try:
            raw = await self.client.get(self.keys.rewrite(key))
        except BEST_EFFORT_ERRORS as exc:  # a busy pool too: a rewrite is never worth a 503
            self._cool_down.failed("get", exc)
            return None
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def put(self, key: str, standalone: str) -> None:
        if not self._cool_down.available:
            return
        try:
            await self.client.set(self.keys.rewrite(key), standalone.encode(), ex=self.ttl_s)
        except BEST_EFFORT_ERRORS as exc:  # a busy pool too: a rewrite is never worth a 503
            self._cool_down.failed("put", exc)
