"""MicroBatcher: concurrent calls share encodes, each gets its own rows, and a cancelled or failing
call does not take the others down. The encode here is a plain function (text -> one-hot-ish row)
gated by threading events, so which calls share a batch is decided by the test, not by timing."""

from __future__ import annotations

import asyncio
import threading
import zlib

import numpy as np
import pytest

from service.embeddings.batching import MicroBatcher
from service.embeddings.vectors import Vectors
from tests.support.servers import wait_until

DIM = 8


def row(text: str) -> Vectors:
    out = np.zeros(DIM, dtype=np.float32)
    out[zlib.crc32(text.encode()) % DIM] = 1.0
    out[-1] = len(text)
    return out


class GatedEncode:
    """Records each batch; while `gate` is clear, encodes block (so later calls pile up)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_next = False

    def __call__(self, texts: list[str]) -> Vectors:
        self.batches.append(list(texts))
        self.started.set()
        self.gate.wait(30)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("model exploded")
        return np.stack([row(t) for t in texts])


async def hold_first_batch(batcher: MicroBatcher, encode: GatedEncode) -> asyncio.Task[Vectors]:
    """Start one call whose encode blocks until encode.gate is set."""
    encode.gate.clear()
    encode.started.clear()
    first = asyncio.create_task(batcher.submit(["first"]))
    await wait_until(encode.started.is_set)
    return first


async def test_calls_waiting_during_an_encode_share_the_next_one_and_get_their_own_rows() -> None:
    encode = GatedEncode()
    batcher = MicroBatcher(encode, window_s=0.0, max_batch=64)
    first = await hold_first_batch(batcher, encode)
    texts = [f"question {i}" for i in range(20)]
    calls = [asyncio.create_task(batcher.submit([t])) for t in texts]
    pair = asyncio.create_task(batcher.submit(["pair a", "pair b"]))
    await asyncio.sleep(0)  # let them enqueue
    encode.gate.set()
    results = await asyncio.gather(*calls)
    assert np.array_equal(await first, row("first")[None])
    for text, got in zip(texts, results, strict=True):
        assert got.shape == (1, DIM) and np.array_equal(got[0], row(text))
    assert np.array_equal(await pair, np.stack([row("pair a"), row("pair b")]))
    assert encode.batches == [["first"], [*texts, "pair a", "pair b"]]
    assert batcher.encodes == 2 and batcher.encoded == 23


async def test_a_batch_never_exceeds_max_batch_except_for_one_large_call() -> None:
    encode = GatedEncode()
    batcher = MicroBatcher(encode, window_s=0.0, max_batch=4)
    first = await hold_first_batch(batcher, encode)
    small = [asyncio.create_task(batcher.submit([f"q{i}"])) for i in range(6)]
    large = asyncio.create_task(batcher.submit([f"big{i}" for i in range(10)]))
    await asyncio.sleep(0)
    encode.gate.set()
    await asyncio.gather(first, *small, large)
    assert [len(b) for b in encode.batches] == [1, 4, 2, 10]
    assert (await large).shape == (10, DIM)


async def test_the_window_gathers_calls_arriving_shortly_after_the_first() -> None:
    encode = GatedEncode()
    # A window far longer than the test needs: the full batch, not the timer, releases it.
    batcher = MicroBatcher(encode, window_s=30.0, max_batch=5)
    calls = [asyncio.create_task(batcher.submit([f"q{i}"])) for i in range(5)]
    await asyncio.gather(*calls)
    assert encode.batches == [[f"q{i}" for i in range(5)]]


async def test_a_cancelled_caller_is_left_out_and_the_others_are_answered() -> None:
    encode = GatedEncode()
    batcher = MicroBatcher(encode, window_s=0.0, max_batch=64)
    first = await hold_first_batch(batcher, encode)
    keep = [asyncio.create_task(batcher.submit([f"keep {i}"])) for i in range(3)]
    gone = asyncio.create_task(batcher.submit(["gone"]))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    encode.gate.set()
    results = await asyncio.gather(first, *keep)
    assert gone.cancelled()
    assert [r[0].tolist() for r in results[1:]] == [row(f"keep {i}").tolist() for i in range(3)]
    assert encode.batches[1] == ["keep 0", "keep 1", "keep 2"]  # the cancelled text was not encoded

    # Cancelling a caller whose batch is already encoding leaves its batch-mates their rows.
    encode.gate.clear()
    encode.started.clear()
    a = asyncio.create_task(batcher.submit(["a"]))
    b = asyncio.create_task(batcher.submit(["b"]))
    await wait_until(encode.started.is_set)
    a.cancel()
    encode.gate.set()
    assert np.array_equal((await b)[0], row("b"))
    with pytest.raises(asyncio.CancelledError):
        await a
    assert np.array_equal((await batcher.submit(["after"]))[0], row("after"))


async def test_a_failing_encode_fails_its_batch_only() -> None:
    encode = GatedEncode()
    batcher = MicroBatcher(encode, window_s=0.0, max_batch=64)
    first = await hold_first_batch(batcher, encode)
    encode.fail_next = True  # the held batch fails when released
    following = [asyncio.create_task(batcher.submit([f"d{i}"])) for i in range(3)]
    await asyncio.sleep(0)
    encode.gate.set()
    with pytest.raises(RuntimeError, match="exploded"):
        await first
    results = await asyncio.gather(*following)  # the next batch ran after the failure
    assert [r[0].tolist() for r in results] == [row(f"d{i}").tolist() for i in range(3)]
    assert [len(b) for b in encode.batches] == [1, 3]
    assert np.array_equal((await batcher.submit(["later"]))[0], row("later"))


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(GatedEncode(), window_s=-1, max_batch=1)
    with pytest.raises(ValueError):
        MicroBatcher(GatedEncode(), window_s=0, max_batch=0)


async def test_a_lone_call_is_encoded_at_once_not_after_the_window() -> None:
    encode = GatedEncode()
    # An hour-long window: a call that waited for company would never finish within the test.
    batcher = MicroBatcher(encode, window_s=3600.0, max_batch=8)
    got = await asyncio.wait_for(batcher.submit(["alone"]), timeout=60)
    assert np.array_equal(got[0], row("alone"))
    assert encode.batches == [["alone"]]
