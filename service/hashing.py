"""The server's secret for keyed question hashes (`service.redis.answer_cache.question_hash`).

RAG_HASH_SECRET when set; otherwise a random secret made on first use and kept in the data
directory (mode 0600), so hashes stay stable across restarts of a local install. Several
processes starting at once agree on one secret: each writes its candidate to a private
temporary file and hard-links it into place, which succeeds for exactly one of them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

from service.settings import Settings

HASH_SECRET_FILE = "hash-secret"  # noqa: S105 (a file name, not a secret)


def hash_key(settings: Settings) -> bytes:
    if settings.hash_secret is not None:
        return settings.hash_secret.get_secret_value().encode()
    path = settings.data_dir / HASH_SECRET_FILE
    if not path.exists():
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, candidate = tempfile.mkstemp(dir=settings.data_dir, prefix=".hash-secret-")  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):  # another process was first: use its secret
                os.link(candidate, path)
        finally:
            Path(candidate).unlink()
    secret = path.read_bytes().strip()
    if len(secret) < 16:
        raise ValueError(f"{path} holds no usable secret; delete it to make a new one, or set RAG_HASH_SECRET")
    return secret
