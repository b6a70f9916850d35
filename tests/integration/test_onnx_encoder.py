"""The ONNX Runtime encoder against the torch one: same vectors, one corpus, a cached export."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
from collections.abc import Callable

import numpy as np
import pytest

from ingest.loaders import SourceDocument
from ingest.pipeline import IngestOptions, ingest_documents
from service.embeddings.encoders import LocalEmbedder, OnnxEmbedder, create_embedder
from service.embeddings.model_cache import EXPORT_FORMAT, ModelUnavailable, ensure_exported, exported_model
from service.embeddings.onnx_encoder import OnnxSession
from service.postgres.corpus import open_corpus
from service.postgres.retrieval import Retriever
from service.settings import Settings
from tests.support.servers import TEST_MODEL_DIR

_LONG = (
    "Retrieval-augmented generation pairs a search index with a language model: the question is "
    "embedded, the nearest passages are fetched, and the model answers from them with citations. "
)
# 50 varied texts: questions, passages, unicode, code, numbers, edge cases, and long texts past
# the model's default 256 word pieces and past its 512-piece position table (truncated alike).
SAMPLE = [
    "How do I flush the cache?",
    "how do i flush the cache",
    "HOW DO I FLUSH THE CACHE???",
    "What is the capital of France?",
    "anthropological definition of environment",
    "causes of left ventricular hypertrophy",
    "axon terminals or synaptic knob definition",
    "Is it safe to revoke an API key while requests are in flight?",
    "Why does the semantic cache refuse questions that differ only in a number, like 2019 vs 2020?",
    "Compare pgvector HNSW and IVFFlat indexes for a 5,000 passage corpus.",
    "The time to live of cached answers is set with RAG_CACHE_TTL_S.",
    "PDF files are parsed with pypdf. Scanned PDFs without a text layer are rejected with a clear reason.",
    "API keys are stored only as hashes. Revoke a key with rag-admin keys revoke followed by its id.",
    "Die Antwort wird zwischengespeichert, bis sich das Korpus ändert.",
    "Où se trouve la bibliothèque municipale ? Elle ferme à 18 h.",
    "¿Cuántos tokens por día puede gastar una clave?",
    "Привет, как очистить кэш ответов?",
    "日本語のテキストも正しく埋め込まれるべきです。",
    "缓存命中时不调用模型。",
    "مرحبا، كيف يمكنني حذف ذاكرة التخزين المؤقت؟",
    "emoji 🙂🚀🔥 and symbols ∑ ∫ √ ≠ ≤ — “quotes” ‘and’ «guillemets»",
    "Zero-width\u200bjoiner and non\u00a0breaking space and tab\tand\nnewline",
    "naïve café résumé coöperate façade",
    "Wie spät ist es in Tōkyō, und was kostet ein Kaffee in Zürich?",
    "def embed(texts: list[str]) -> np.ndarray:\n    return model.encode(texts, normalize_embeddings=True)",
    "SELECT chunk_id, embedding <=> $1 AS distance FROM chunks ORDER BY distance LIMIT 40;",
    '{"question": "How do I flush the cache?", "max_tokens": 8192}',
    "https://example.com/docs/operations.md#tracing?utm_source=test&x=1",
    "3.14159 2.71828 1.41421 42 1e-12 0xDEADBEEF 2026-12-02T16:04:03Z",
    "Total: $1,234.56 (incl. 19% VAT) — due 31/12/2026.",
    "supercalifragilisticexpialidocious " * 3,
    "a",
    "?",
    "...",
    "",
    "   ",
    "  leading and trailing spaces  ",
    "UPPER lower MiXeD CaSe",
    "the the the the the the the the the the",
    "Not a question at all, just a statement about budgets and caps.",
    "The cache is not flushed when a key is revoked.",
    "The cache is flushed when a key is revoked.",
    "Tokens per day: 100. Requests per minute: 10.",
    "Passage: " + _LONG,
    _LONG * 3,  # ~120 word pieces
    _LONG * 8,  # > 256 word pieces
    _LONG * 9,  # > 256
    ("Ünïcödé 日本語 " + _LONG) * 8,  # long and unicode
    "\n".join(f"{i}. step number {i} of the runbook" for i in range(36)),  # long list
    "x " * 600,  # > 512: truncated at 512 by both
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    result: np.ndarray = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return result


def test_the_sample_covers_long_texts(onnx_embedder: OnnxEmbedder) -> None:
    assert len(SAMPLE) >= 50
    tokenizer = onnx_embedder._load()._tokenizer
    tokenizer.no_truncation()
    try:
        lengths = [len(e.ids) for e in tokenizer.encode_batch(SAMPLE)]
    finally:
        tokenizer.enable_truncation(max_length=512)
    assert sum(n > 256 for n in lengths) >= 5 and sum(n > 512 for n in lengths) >= 1


def by_length(encode: Callable[[list[str]], np.ndarray], texts: list[str], size: int = 10) -> np.ndarray:
    """encode(texts) in groups of similar length: one batch of all pads every text to 512 pieces."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.empty((len(texts), 384), dtype=np.float32)
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        out[rows] = encode([texts[i] for i in rows])
    return out


@pytest.mark.timeout(600)  # loading torch alone takes a minute on a busy 2-core machine
def test_onnx_vectors_equal_the_torch_vectors(onnx_embedder: OnnxEmbedder, local_embedder: LocalEmbedder) -> None:
    got = onnx_embedder.encode(SAMPLE)
    expected = by_length(local_embedder.encode, SAMPLE)
    assert got.shape == expected.shape == (len(SAMPLE), 384) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    worst = cosines(got, expected)
    assert worst.min() >= 0.99, [(SAMPLE[i][:40], float(worst[i])) for i in np.argsort(worst)[:3]]
    # In fact they are the same vectors up to float rounding (fp32 export, same pooling).
    assert worst.min() >= 0.9999


async def test_concurrent_questions_share_encodes_and_get_the_vectors_of_a_single_encode(
    onnx_embedder: OnnxEmbedder,
) -> None:
    alone = np.concatenate([onnx_embedder.encode([text]) for text in SAMPLE])
    encodes_before = onnx_embedder.batcher.encodes
    results = await asyncio.gather(*(onnx_embedder.embed([text]) for text in SAMPLE))
    batched = np.concatenate(results)
    assert batched.shape == (len(SAMPLE), 384)
    # Padding to a batch-mate's length changes nothing beyond float rounding.
    assert cosines(batched, alone).min() >= 0.99999
    assert onnx_embedder.batcher.encodes - encodes_before < len(SAMPLE)  # they were batched


async def test_a_corpus_written_by_torch_is_served_by_onnx(
    settings: Settings, local_embedder: LocalEmbedder, onnx_embedder: OnnxEmbedder
) -> None:
    docs = [
        SourceDocument("kb", "cache.md", "mem://cache", "Cache", "To flush the cache, run rag-admin cache flush."),
        SourceDocument("kb", "keys.md", "mem://keys", "Keys", "API keys are stored only as hashes; revoke them by id."),
        SourceDocument("kb", "pdf.md", "mem://pdf", "PDF", "Scanned PDFs without a text layer are rejected."),
    ]
    options = IngestOptions(chunk_tokens=200, chunk_overlap=20)
    async with open_corpus(settings) as corpus:
        await ingest_documents(corpus.store, local_embedder, docs, options)
        retriever = Retriever(corpus.pool)
        question = "how are api keys kept?"
        via_onnx = await retriever.search((await onnx_embedder.embed([question]))[0], question, top_k=3, mode="dense")
        via_torch = await retriever.search(local_embedder.encode([question])[0], question, top_k=3, mode="dense")
        assert [s.chunk_id for s in via_onnx] == [s.chunk_id for s in via_torch]
        assert via_onnx[0].document == "Keys"
        # Re-ingesting the same documents with the other runtime re-embeds nothing: same model.
        report = await ingest_documents(corpus.store, onnx_embedder, docs, options)
        assert report.embeddings_computed == 0 and report.added == 0


def test_the_export_is_private_complete_and_reused() -> None:
    exported = ensure_exported(TEST_MODEL_DIR)
    manifest = json.loads(exported.manifest.read_text())
    assert manifest["model"] == "sentence-transformers/all-MiniLM-L6-v2" and manifest["precision"] == "fp32"
    assert manifest["min_cosine_to_torch"] >= 0.9999
    for path in (exported.model, exported.weights, exported.tokenizer, exported.manifest):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The weights live outside the graph, so ONNX Runtime maps them rather than copying ~90 MB.
    assert manifest["weights"] == exported.weights.name
    assert exported.weights.stat().st_size > 80_000_000 > 1_000_000 > exported.model.stat().st_size
    for directory in (exported.directory, exported.directory.parent, TEST_MODEL_DIR):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    before = exported.model.stat().st_mtime_ns
    assert ensure_exported(TEST_MODEL_DIR) == exported and exported.model.stat().st_mtime_ns == before
    assert not [p for p in exported.directory.parent.iterdir() if p.name.startswith(".export-")]


def test_an_export_that_does_not_finish_leaves_nothing_behind(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "models"
    with pytest.raises(ModelUnavailable, match="took over"):
        ensure_exported(root, timeout_s=0.05)
    target = exported_model(root)
    assert not target.directory.exists()
    assert list(target.directory.parent.iterdir()) == []  # no staging directory left either
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_an_older_export_is_served_when_no_new_one_can_be_made(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A worker given a model directory exported by an older version, where no export can run
    (here: one that cannot finish in time; in production: no torch), starts on the older export."""
    current = ensure_exported(TEST_MODEL_DIR)
    root = tmp_path / "models"
    older = exported_model(root, EXPORT_FORMAT - 1)
    older.directory.parent.mkdir(parents=True)
    shutil.copytree(current.directory, older.directory)  # the same vectors whatever the layout
    assert ensure_exported(root, timeout_s=0.05) == older
    assert not exported_model(root).directory.exists()
    texts = ["How do I flush the cache?", "ünïcödé"]
    vectors = OnnxSession(older.model, older.tokenizer, threads=1).encode(texts)
    expected = OnnxSession(current.model, current.tokenizer, threads=1).encode(texts)
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    with pytest.raises(ModelUnavailable):  # nothing older either: the failure stands
        ensure_exported(tmp_path / "empty", timeout_s=0.05)


def test_the_factory_serves_minilm_on_onnx_and_anything_else_on_torch(settings: Settings) -> None:
    default = create_embedder(settings.model_copy(update={"torch_threads": 2, "embed_max_batch": 8}))
    assert isinstance(default, OnnxEmbedder) and default.threads == 2 and default.batcher.max_batch == 8
    assert default.model_dir == settings.resolved_model_dir()
    assert default.model == "sentence-transformers/all-MiniLM-L6-v2"
    torch = create_embedder(settings.model_copy(update={"embedding_runtime": "torch"}))
    assert isinstance(torch, LocalEmbedder) and torch.model == default.model
    unset = settings.model_copy(update={"model_dir": None})
    assert unset.resolved_model_dir() == settings.data_dir / "models"
