"""The semantic cache (real Postgres + pgvector, real all-MiniLM-L6-v2) with the judge deciding."""

from __future__ import annotations

import pytest

from service.embeddings.encoders import LocalEmbedder
from service.postgres.corpus import Corpus
from service.postgres.semantic_index import SemanticCache
from service.settings import Settings

SCOPE = "scope-1"


async def lookup(cache: SemanticCache, embedder: LocalEmbedder, cached: str, asked: str) -> list[str]:
    """File `cached` in the index, then ask `asked`: the keys of the matches served."""
    vectors = await embedder.embed([cached, asked])
    await cache.add(f"key:{cached}", SCOPE, cached, f"hash:{cached}", vectors[0])
    return [match.key for match in await cache.candidates(SCOPE, vectors[1], asked)]


@pytest.mark.parametrize(
    ("cached", "asked"),
    [
        ("How do I flush the cache?", "how can i flush the cache"),
        ("How do I flush the cache?", "how to flush the cache"),
    ],
)
async def test_a_true_paraphrase_is_served(
    corpus: Corpus, settings: Settings, local_embedder: LocalEmbedder, cached: str, asked: str
) -> None:
    cache = SemanticCache(corpus.pool, threshold=settings.semantic_cache_threshold, ttl_s=60)
    assert await lookup(cache, local_embedder, cached, asked) == [f"key:{cached}"]


async def test_a_paraphrase_in_other_words_is_a_candidate_down_to_a_verifiers_floor(
    corpus: Corpus, settings: Settings, local_embedder: LocalEmbedder
) -> None:
    """Precision first: the default threshold refuses it (score 0.83); a verifier's floor lets it be asked about."""
    cached, asked = "How many people live in Tokyo?", "What is the population of Tokyo?"
    cache = SemanticCache(corpus.pool, threshold=settings.semantic_cache_threshold, ttl_s=60)
    assert await lookup(cache, local_embedder, cached, asked) == []
    vector = (await local_embedder.embed([asked]))[0]
    assert [m.question for m in await cache.candidates(SCOPE, vector, asked, floor=0.5)] == [cached]


@pytest.mark.parametrize(
    ("cached", "asked"),
    [
        ("Why is the API on port 8000?", "Why is the API on port 8080?"),  # number
        ("Can I use ragcache with Docker?", "Can I use ragcache without Docker?"),  # negation
        ("Convert celsius to fahrenheit", "Convert fahrenheit to celsius"),  # swapped direction
        ("How do I connect ragcache to Postgres?", "How do I connect ragcache to MySQL?"),  # another entity
    ],
)
async def test_a_near_miss_is_not_served(
    corpus: Corpus, settings: Settings, local_embedder: LocalEmbedder, cached: str, asked: str
) -> None:
    cache = SemanticCache(corpus.pool, threshold=settings.semantic_cache_threshold, ttl_s=60)
    assert await lookup(cache, local_embedder, cached, asked) == []
    # the same cached question is found when asked with the same words: the refusal is the judge's
    assert await lookup(cache, local_embedder, cached, cached) == [f"key:{cached}"]
