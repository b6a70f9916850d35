"""Micro-batching: concurrent embedding calls in one process share one encode.

A question's embedding is a few milliseconds of model time plus a fixed cost per call; under
load, encoding questions one at a time behind a lock made each wait for all the others. Here the
first waiting call holds the door open for a short window (or until a batch is full), then one
blocking encode runs in a thread for everything that is waiting, and while it runs the next batch
gathers. The event loop never runs the model, and a cancelled caller is simply left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.embeddings.vectors import Vectors

Encode = Callable[[list[str]], Vectors]


class BatcherStopped(RuntimeError):
    """The batch a call was waiting in was abandoned (its event loop is shutting down)."""


@dataclass
class _Request:
    texts: list[str]
    future: asyncio.Future[Vectors]
    since: float  # loop time when it started waiting
    alone: bool  # no other call arrived within the window before it


@dataclass
class _LoopState:
    """Waiting calls of one event loop (a process may run several loops: tests, benchmarks)."""

    pending: deque[_Request] = field(default_factory=deque)
    texts_waiting: int = 0
    full: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None
    last_arrival: float = float("-inf")  # loop time of the latest call


class MicroBatcher:
    """`await submit(texts)` returns the rows of `encode(texts)`, encoded together with other calls'.

    `window_s`: how long the oldest waiting call waits for company (0: no wait; calls that arrive
    while an encode runs are batched anyway). A lone call (none other waiting, and none arrived in
    the window before it) does not wait. `max_batch`: most texts per encode; one call with
    more texts than that is encoded alone (`encode` splits it itself).
    """

    def __init__(self, encode: Encode, *, window_s: float, max_batch: int) -> None:
        if window_s < 0 or max_batch < 1:
            raise ValueError("window_s must be >= 0 and max_batch >= 1")
        self._encode = encode
        self.window_s = window_s
        self.max_batch = max_batch
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        self.encodes = 0  # encode calls made, for metrics and tests
        self.encoded = 0  # texts encoded

    async def submit(self, texts: list[str]) -> Vectors:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState()
        future: asyncio.Future[Vectors] = loop.create_future()
        now = loop.time()
        state.pending.append(_Request(list(texts), future, now, alone=now - state.last_arrival > self.window_s))
        state.last_arrival = now
        state.texts_waiting += len(texts)
        if state.texts_waiting >= self.max_batch:
            state.full.set()
        if state.runner is None or state.runner.done():
            state.runner = loop.create_task(self._run(state), name="embed-batcher")
        # Cancelling this call cancels only its own future; the runner skips it.
        return await future

    async def _run(self, state: _LoopState) -> None:
        loop = asyncio.get_running_loop()
        batch: list[_Request] = []
        try:
            while state.pending:
                first = state.pending[0]
                delay = first.since + self.window_s - loop.time()
                # A call with no other in sight (an idle worker) is encoded at once: the window
                # would only add its length to the request. Under load calls arrive in runs.
                lone = first.alone and len(state.pending) == 1
                if delay > 0 and not lone and state.texts_waiting < self.max_batch:
                    state.full.clear()
                    with contextlib.suppress(TimeoutError):  # the window closed before the batch filled
                        await asyncio.wait_for(state.full.wait(), delay)
                batch = self._take(state)
                if not batch:
                    continue
                texts = [text for request in batch for text in request.texts]
                try:
                    vectors = await asyncio.to_thread(self._encode, texts)
                except Exception as exc:  # the model failed: every caller of this batch hears of it
                    for request in batch:
                        if not request.future.done():
                            request.future.set_exception(exc)
                    batch = []
                    continue
                self.encodes += 1
                self.encoded += len(texts)
                offset = 0
                for request in batch:
                    rows = np.array(vectors[offset : offset + len(request.texts)], dtype=np.float32)
                    offset += len(request.texts)
                    if not request.future.done():
                        request.future.set_result(rows)
                batch = []
        finally:
            # Only reached with work left when the runner itself is cancelled (loop shutdown).
            stranded = [*batch, *state.pending]
            state.pending.clear()
            state.texts_waiting = 0
            for request in stranded:
                if not request.future.done():
                    request.future.set_exception(BatcherStopped("the embedding batch was abandoned"))

    def _take(self, state: _LoopState) -> list[_Request]:
        """Waiting calls in arrival order, up to max_batch texts (at least one call); cancelled ones dropped."""
        batch: list[_Request] = []
        size = 0
        while state.pending:
            request = state.pending[0]
            if request.future.done():  # its caller went away
                state.pending.popleft()
                state.texts_waiting -= len(request.texts)
                continue
            if batch and size + len(request.texts) > self.max_batch:
                break
            state.pending.popleft()
            state.texts_waiting -= len(request.texts)
            batch.append(request)
            size += len(request.texts)
        return batch
