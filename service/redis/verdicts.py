"""The verdict cache: the small tier's yes/no on serving a cached answer to another wording, so a repeat
makes no call (service/answer/verification.py).

Keyed by the cached entry's key and a digest of the new wording (normalised like the answer cache's
key) and the model that judged; a verdict expires with the entry it is about (the entry's remaining
time to live) and `rag-admin cache flush` deletes it with the answers (`verdict:` family). Fail-soft
like the rewrite cache: without Redis every candidate is simply verified again.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from service.policy.guardrails import normalize_for_key
from service.redis.answer_cache import digest
from service.redis.keyspace import BEST_EFFORT_ERRORS, KEYS, CoolDown, Keyspace


class VerdictCache:
    def __init__(self, client: aioredis.Redis, *, keys: Keyspace = KEYS) -> None:
        self.client = client
        self.keys = keys
        self._cool_down = CoolDown("semantic verdict cache off")

    def key(self, entry: str, question: str, model: str) -> str:
        return self.keys.verdict(entry, digest({"q": normalize_for_key(question), "m": model}))

    async def get(self, entry: str, question: str, model: str) -> bool | None:
        """The remembered verdict, or None when there is none (or Redis is away)."""
        if not self._cool_down.available:
            return None
        try:
            raw = await self.client.get(self.key(entry, question, model))
        except BEST_EFFORT_ERRORS as exc:  # a busy pool too: a verdict is never worth a 503
            self._cool_down.failed("get", exc)
            return None
        return None if raw is None else raw in (b"1", "1")

    async def put(self, entry: str, question: str, model: str, same: bool) -> None:
        """Remember `same` for as long as the entry `entry` lives (nothing if it is already gone)."""
        if not self._cool_down.available:
            return
        try:
            left_ms = await self.client.pttl(self.keys.answer(entry))
            if left_ms > 0:
                await self.client.set(self.key(entry, question, model), b"1" if same else b"0", px=left_ms)
        except BEST_EFFORT_ERRORS as exc:
            self._cool_down.failed("put", exc)
