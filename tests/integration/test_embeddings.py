"""The OpenAI-compatible embedder through the real openai SDK against the loopback server."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.loaders import SourceDocument
from ingest.pipeline import IngestOptions, ingest_documents
from service.cli.serve import torch_threads_per_worker
from service.embeddings.encoders import LocalEmbedder, OnnxEmbedder, OpenAIEmbedder, create_embedder
from service.postgres.corpus import open_corpus
from service.settings import Settings
from tests.support.provider_server import Behavior, ProviderServer


async def test_openai_embedder_batches_normalises_and_retries_429() -> None:
    with ProviderServer(embedding_dim=64) as server:
        embedder = OpenAIEmbedder("custom-embed", api_key="k", base_url=server.openai_base_url, dim=64, max_retries=2)
        server.enqueue(Behavior(status=429, retry_after=0.01), route="embeddings")
        vectors = await embedder.embed(["alpha", "beta", "alpha"])
        assert vectors.shape == (3, 64) and vectors.dtype == np.float32
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert np.allclose(vectors[0], vectors[2]) and not np.allclose(vectors[0], vectors[1])
        calls = server.calls_to("embeddings")
        assert [c.status for c in calls] == [429, 200]
        assert calls[-1].body["input"] == ["alpha", "beta", "alpha"] and calls[-1].body["model"] == "custom-embed"


def test_unknown_dimension_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="RAG_EMBEDDING_DIM"):
        OpenAIEmbedder("mystery-model", api_key=None, base_url="http://127.0.0.1:9")


async def test_ingest_with_openai_embeddings_records_the_model(settings: Settings) -> None:
    with ProviderServer(embedding_dim=1536) as server:
        configured = settings.model_copy(
            update={"embedding_provider": "openai", "openai_base_url": server.openai_base_url}
        )
        async with open_corpus(configured, with_embedder=True) as corpus:
            assert corpus.embedder is not None and corpus.embedder.dim == 1536
            docs = [SourceDocument("s", str(i), f"mem://{i}", "", f"Document number {i}.") for i in range(5)]
            report = await ingest_documents(corpus.store, corpus.embedder, docs, IngestOptions(window=2))
            assert report.added == 5 and report.embeddings_computed == 5
            assert len(server.calls_to("embeddings")) == 3  # batches of 2, 2, 1
            row = await corpus.pool.fetchrow("SELECT embedding_model, embedding_dim FROM corpus")
            assert tuple(row) == ("text-embedding-3-small", 1536)


def test_workers_share_the_cores_between_their_models(settings: Settings) -> None:
    assert [torch_threads_per_worker(w, cores=8) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    embedder = create_embedder(settings.model_copy(update={"torch_threads": 2}))
    assert isinstance(embedder, OnnxEmbedder) and embedder.threads == 2
    embedder = create_embedder(settings.model_copy(update={"torch_threads": 2, "embedding_runtime": "torch"}))
    assert isinstance(embedder, LocalEmbedder) and embedder.threads == 2
