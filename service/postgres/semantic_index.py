"""The semantic cache's index: cached questions' embeddings in pgvector.

Looked up after an exact miss. The nearest few cached questions of the same scope are candidates;
one counts only if the judge of `service.policy.semantic_judge` accepts it (hard vetoes on numbers,
negations and direction, then a learned duplicate score >= the threshold) and its answer still
exists in the exact cache, which is where invalidation happens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg
import numpy as np
import numpy.typing as npt

from service.policy.guardrails import redact_pii
from service.policy.semantic_judge import judge

log = logging.getLogger(__name__)

CANDIDATES = 5  # the nearest may be a near-miss the judge rejects; look a little further
PRUNE_EVERY = 200  # writes between deletions of expired rows


@dataclass(frozen=True)
class SemanticMatch:
    key: str  # the exact-cache key of the matched question's answer
    similarity: float
    question_hash: str
    question: str = ""  # the matched (cached) question, redacted: what a verifier compares
    verified: bool = False  # the small tier said yes (service/answer/verification.py)


class SemanticCache:
    def __init__(self, pool: asyncpg.Pool, *, threshold: float, ttl_s: int) -> None:
        self.pool = pool
        self.threshold = threshold
        self.ttl_s = ttl_s
        self._writes = 0

    async def candidates(
        self, scope: str, vector: npt.NDArray[np.float32], question: str, floor: float | None = None
    ) -> list[SemanticMatch]:
        """Candidates the judge accepts, nearest first: a score of at least `threshold`, or of `floor` when
        given (candidates a verifier must then confirm)."""
        threshold = self.threshold if floor is None else min(floor, self.threshold)
        rows = await self.pool.fetch(
            """SELECT key, question, question_hash, 1 - (embedding <=> $1) AS similarity
               FROM semantic_cache
               WHERE scope = $2 AND expires_at > now()
               ORDER BY embedding <=> $1 LIMIT $3""",
            vector,
            scope,
            CANDIDATES,
        )
        matches = []
        for row in rows:
            decision = judge(float(row["similarity"]), question, row["question"], threshold=threshold)
            if decision.hit:
                similarity = round(decision.similarity, 4)
                matches.append(SemanticMatch(row["key"], similarity, row["question_hash"], row["question"]))
        return matches

    async def add(
        self, key: str, scope: str, question: str, question_hash: str, vector: npt.NDArray[np.float32]
    ) -> None:
        await self.pool.execute(
            """INSERT INTO semantic_cache (key, scope, question, question_hash, embedding, expires_at)
               VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
               ON CONFLICT (key) DO UPDATE SET embedding = excluded.embedding, expires_at = excluded.expires_at""",
            key,
            scope,
            redact_pii(question),  # already redacted unless RAG_GUARD_PII=allow: nothing personal at rest
            question_hash,
            vector,
            float(self.ttl_s),
        )
        self._writes += 1
        if self._writes % PRUNE_EVERY == 0:
            await self.prune()

    async def forget(self, key: str) -> None:
        """A row whose answer is gone from the exact cache (invalidated, expired, flushed)."""
        await self.pool.execute("DELETE FROM semantic_cache WHERE key = $1", key)

    async def prune(self) -> int:
        status = await self.pool.execute("DELETE FROM semantic_cache WHERE expires_at < now()")
        return int(status.split()[-1])
