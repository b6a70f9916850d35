"""The admission gate: at most N requests per worker do the work before a miss's first token.

That work (embedding the question, the semantic lookup, retrieval) is CPU and database time
that every miss needs; run for hundreds of misses at once it slows all of them alike, and one
key's burst delays every other key's answer. The gate lets `slots` of them run at a time; the
rest wait in a bounded queue served round-robin by key (service/policy/fair_queue.py), for at
most `wait_s`. Past that, or when the queue is full and this key has the longest backlog, the
request is refused with `AdmissionRefused` (an `Overloaded`: 503 `overloaded` with
`Retry-After`): a clean "later", never an answer that comes a minute late. Cache hits never pass through the gate.

`slots=0` turns the gate off (every request is admitted at once).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from service.errors import AdmissionRefused
from service.observability.logs import note
from service.policy.fair_queue import FairQueue


class AdmissionGate:
    def __init__(
        self,
        slots: int,
        *,
        queue: int = 256,
        wait_s: float = 3.0,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.slots = slots
        self.wait_s = wait_s
        self._free = slots
        self._queue: FairQueue[asyncio.Future[None]] = FairQueue(queue)
        self._on_wait = on_wait  # seconds each admitted or refused request waited (a histogram)
        self.retry_after = max(1, math.ceil(wait_s))

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self.slots - self._free

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[float]:
        """Hold one slot for the block; yields the seconds waited for it. Raises `AdmissionRefused`."""
        if self.slots <= 0:
            yield 0.0
            return
        started = time.perf_counter()
        try:
            await self._acquire(key)
        finally:  # admitted or refused: the access line and the histogram say how long it waited
            waited = time.perf_counter() - started
            note(admission_wait_ms=round(waited * 1000, 1))
            if self._on_wait is not None:
                self._on_wait(waited)
        try:
            yield waited
        finally:
            self._release()

    async def _acquire(self, key: str) -> None:
        if self._free > 0 and not len(self._queue):
            self._free -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        displaced = self._queue.push(key, turn)
        if displaced is turn:
            raise self._refusal("the admission queue is full")
        if displaced is not None:
            displaced.set_exception(self._refusal("the admission queue is full"))
        try:
            async with asyncio.timeout(self.wait_s):
                await turn
        except BaseException as exc:
            if not self._queue.remove(key, turn) and turn.done() and not turn.cancelled() and not turn.exception():
                self._release()  # the slot was handed to us as we gave up: pass it on
            if isinstance(exc, TimeoutError):
                raise self._refusal("no admission slot within the wait budget") from None
            raise

    def _release(self) -> None:
        while (turn := self._queue.pop()) is not None:
            if not turn.done():
                turn.set_result(None)  # the slot passes straight to the next waiter
                return
        self._free += 1

    def _refusal(self, why: str) -> AdmissionRefused:
        return AdmissionRefused(f"the service is busy ({why}); retry shortly", self.retry_after)
