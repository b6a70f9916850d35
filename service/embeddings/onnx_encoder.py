"""all-MiniLM-L6-v2 on ONNX Runtime: the serving encoder, with no torch or transformers in the process.

The model is the fp32 export of the packaged weights (model_cache.py); tokenisation is the
model's own fast tokenizer through the `tokenizers` package; pooling and normalisation are
sentence-transformers' (mean over real tokens, then L2). The vectors equal the torch encoder's
(cosine >= 0.99999 on the test sample), so one corpus can be written by either.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.embeddings.batching import MicroBatcher
from service.embeddings.memory import release_free_memory
from service.embeddings.model_cache import ensure_exported
from service.embeddings.vectors import Vectors, l2_normalise, mean_pool

MAX_LENGTH = 512  # word pieces; the model's position table (LocalEmbedder uses the same)
DIM = 384
BATCH_TOKENS = 8192  # padded word pieces per model run (64 questions, or 16 full-length chunks)


def _batches(lengths: Sequence[int], max_rows: int) -> list[list[int]]:
    """Indices grouped by similar length (ascending), each group at most `max_rows` texts and
    BATCH_TOKENS padded word pieces: a 512-piece text never drags 63 short ones to its width."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    group: list[int] = []
    for i in order:
        if group and (len(group) >= max_rows or (len(group) + 1) * lengths[i] > BATCH_TOKENS):
            groups.append(group)
            group = []
        group.append(i)
    if group:
        groups.append(group)
    return groups


class OnnxSession:
    """A loaded model and tokenizer; `encode` is blocking and safe to call from any thread."""

    def __init__(self, model: Path, tokenizer: Path, *, threads: int | None, batch_size: int = 64) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: one per core
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle runtime threads spinning for work took CPU from the event loop and other workers.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        # No arena: ORT's arena keeps the peak of every batch it ever ran (+330 MB after 32 texts of
        # 200 word pieces) and never shrinks. Without it the tensors are freed after each run and
        # `encode` trims the heap; the memory pattern (planned buffer reuse within a run) stays.
        options.enable_cpu_mem_arena = False
        self._session: Any = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tokenizer: Any = Tokenizer.from_file(str(tokenizer))
        self._tokenizer.no_padding()  # the file pads to 128; we pad each batch to its longest text
        self._tokenizer.enable_truncation(max_length=MAX_LENGTH)
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one run at a time: a run already uses every thread given

    def encode(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(list(texts))
        lengths = [len(e.ids) for e in encodings]
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for rows in _batches(lengths, self.batch_size):
            width = max(lengths[i] for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                ids[r, : lengths[i]] = encodings[i].ids
                mask[r, : lengths[i]] = 1
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            with self._lock:
                (tokens,) = self._session.run(None, {k: v for k, v in feed.items() if k in self._inputs})
            out[rows] = mean_pool(np.asarray(tokens, dtype=np.float32), mask)
            del tokens, feed, ids, mask
        release_free_memory()
        return l2_normalise(out)


class OnnxEmbedder:
    """The Embedder for serving (and ingest): ONNX Runtime behind a micro-batcher.

    Cheap to construct; the first use (or `warm_up`) exports the model into `model_dir` if it is
    not there yet, in a child process, then loads it.
    """

    def __init__(
        self,
        model: str,
        *,
        model_dir: Path,
        batch_size: int = 64,
        threads: int | None = None,
        batch_window_ms: float = 2.0,
        max_batch: int = 32,
    ) -> None:
        self.model = model
        self.dim = DIM
        self.model_dir = model_dir
        self.batch_size = batch_size
        self.threads = threads
        self._session: OnnxSession | None = None
        self._load_lock = threading.Lock()
        self.batcher = MicroBatcher(self.encode, window_s=batch_window_ms / 1000, max_batch=max_batch)

    def _load(self) -> OnnxSession:
        with self._load_lock:
            if self._session is None:
                exported = ensure_exported(self.model_dir)
                self._session = OnnxSession(
                    exported.model, exported.tokenizer, threads=self.threads, batch_size=self.batch_size
                )
            return self._session

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Blocking encode, for callers already off the event loop (and for benchmarks)."""
        return self._load().encode(texts)

    async def warm_up(self) -> None:
        await asyncio.to_thread(self._load)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return await self.batcher.submit(list(texts))
