"""Give freed heap memory back to the system (glibc `malloc_trim`); a no-op elsewhere.

ONNX Runtime's intermediate tensors for a batch of long texts take hundreds of MB. Freed, they stay
in glibc's heap as free pages of the process (its RSS) until trimmed: a worker that encoded one
large batch kept ~500 MB for good. Trimming after an encode returns them; it takes ~0.1 ms after a
question and a few ms after a large batch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> None:
    """Return the heap's free pages to the system (glibc only; elsewhere nothing happens)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
