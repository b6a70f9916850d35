"""The shared token counter sheds tiktoken's Python copy of the ranks and still counts the same."""

from __future__ import annotations

import pickle

import tiktoken
from tiktoken import registry

from service.policy.tokens import ENCODING_NAME, count_tokens, encoding

TEXTS = [
    "How do I flush the cache?",
    "Ünïcödé, 日本語のテキスト and emoji 🙂 in one line.",
    "A longer passage about retrieval-augmented generation, caching and budgets. " * 40,
    "",
    "<|endoftext|> is ordinary text here",
]


def test_counts_and_round_trips_match_a_full_tiktoken_encoding() -> None:
    registry._find_constructors()
    assert registry.ENCODING_CONSTRUCTORS is not None
    full = tiktoken.Encoding(**registry.ENCODING_CONSTRUCTORS[ENCODING_NAME]())  # keeps its Python ranks
    enc = encoding()
    for text in TEXTS:
        assert count_tokens(text) == len(full.encode_ordinary(text))
        tokens = enc.encode_ordinary(text)
        assert tokens == full.encode_ordinary(text)
        assert enc.decode_bytes(tokens) == text.encode("utf-8")
    assert enc.n_vocab == full.n_vocab and enc.max_token_value == full.max_token_value
    pickled = pickle.dumps(enc)
    assert len(pickled) < 200  # registered: pickled by its name, not by its ranks
    assert pickle.loads(pickled).encode_ordinary(TEXTS[1]) == full.encode_ordinary(TEXTS[1])


def test_the_python_copy_of_the_ranks_is_not_kept() -> None:
    assert len(encoding()._mergeable_ranks) == 0  # ~16 MB per worker (docs/benchmarks.md, "API worker memory")
