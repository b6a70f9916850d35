"""Shared cache entries and what they reveal: `refresh` is an admin operation (issue 12, finding 13),
and question hashes that leave the server are keyed with a server secret (finding 14)."""

from __future__ import annotations

import hashlib
import hmac
import stat

from pydantic import SecretStr

from service.embeddings.encoders import LocalEmbedder
from service.hashing import hash_key
from service.policy.guardrails import normalize_for_key
from service.settings import Settings
from tests.support.answers import FLUSH, ask, running, seed
from tests.support.servers import bearer, make_key

PARAPHRASE = "how can i flush the cache"


async def test_refresh_needs_the_admin_scope(settings: Settings, local_embedder: LocalEmbedder) -> None:
    await seed(settings, local_embedder)
    admin = await make_key(settings, "admin")
    async with running(settings, local_embedder) as http:  # a query key
        first = await ask(http, FLUSH)
        assert first.status == 200 and first.meta["cache"] == "miss"
        refused = await ask(http, FLUSH, cache="refresh")
        assert refused.status == 403, refused.body
        assert refused.body["error"]["code"] == "refresh_forbidden"
        assert "admin" in refused.body["error"]["message"]
        json_refused = await http.post("/rag/answer", json={"question": FLUSH, "cache": "refresh"})
        assert json_refused.status_code == 403 and json_refused.json()["error"]["code"] == "refresh_forbidden"
        chat = {"model": "auto", "messages": [{"role": "user", "content": FLUSH}], "rag": {"cache": "refresh"}}
        for stream in (False, True):
            response = await http.post("/v1/chat/completions", json={**chat, "stream": stream})
            assert response.status_code == 403, response.text
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("refresh_forbidden", "rag.cache")
        # the shared answer is still the cached one
        assert (await ask(http, FLUSH)).meta["cache"] == "hit"
        # an admin key may refresh it: the answer is generated again and replaces the entry
        refreshed = await ask(http, FLUSH, cache="refresh", headers=bearer(admin))
        assert refreshed.status == 200 and refreshed.meta["cache"] == "miss"
        # "use" and "bypass" stay open to query keys
        assert (await ask(http, FLUSH, cache="bypass")).meta["cache"] == "bypass"


def _unkeyed(question: str) -> str:
    return hashlib.sha256(normalize_for_key(question).encode()).hexdigest()[:16]


def _keyed(question: str, secret: bytes) -> str:
    return hmac.new(secret, normalize_for_key(question).encode(), hashlib.sha256).hexdigest()[:16]


async def test_matched_question_hash_is_keyed_with_the_configured_secret(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    secret = "s3cret-for-this-test-only-0123456789"
    settings = settings.model_copy(update={"hash_secret": SecretStr(secret)})
    await seed(settings, local_embedder)
    async with running(settings, local_embedder) as http:
        assert (await ask(http, FLUSH)).meta["cache"] == "miss"
        para = await ask(http, PARAPHRASE)
    assert para.meta["cache"] == "semantic_hit"
    shown = para.meta["semantic"]["matched_question_hash"]
    assert shown != _unkeyed(FLUSH)  # a dictionary of likely questions no longer reverses it
    assert shown == _keyed(FLUSH, secret.encode())


async def test_without_a_configured_secret_one_is_made_once_and_kept_private(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    await seed(settings, local_embedder)
    path = settings.data_dir / "hash-secret"
    async with running(settings, local_embedder) as http:
        assert (await ask(http, FLUSH)).meta["cache"] == "miss"
        para = await ask(http, PARAPHRASE)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_bytes().strip()
    assert len(secret) >= 32
    shown = para.meta["semantic"]["matched_question_hash"]
    assert shown != _unkeyed(FLUSH) and shown == _keyed(FLUSH, secret)
    assert hash_key(settings) == secret  # read again, as after a restart: the same secret, the same hashes
    assert path.read_bytes().strip() == secret
