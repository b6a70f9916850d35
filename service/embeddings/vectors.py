"""Vector arithmetic shared by the encoders: mean pooling and L2 normalisation, as sentence-transformers does them."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]


def l2_normalise(vectors: Vectors) -> Vectors:
    """Rows scaled to unit length; a zero row stays zero (torch's F.normalize, eps 1e-12)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalised: Vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return normalised


def mean_pool(token_embeddings: Vectors, attention_mask: npt.NDArray[np.int64]) -> Vectors:
    """The mean of each row's real (unpadded) token embeddings: sentence-transformers' Pooling(mean)."""
    mask = attention_mask[..., None].astype(np.float32)
    summed = (token_embeddings * mask).sum(axis=1)
    counts = np.maximum(mask.sum(axis=1), 1e-9)
    pooled: Vectors = (summed / counts).astype(np.float32, copy=False)
    return pooled
