"""API keys on the real key table: the look-up cache, scopes over HTTP, revocation, and `rag-admin keys`."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import httpx
import pytest
from typer.testing import CliRunner

from service.cli.admin import app as admin_app
from service.embeddings.encoders import LocalEmbedder
from service.errors import AuthUnavailable
from service.http.app import create_app
from service.http.auth import ApiKey, Authenticator, KeyStore, parse_key
from service.postgres.corpus import open_corpus
from service.settings import Settings
from tests.support.answers import ask, running, seed
from tests.support.servers import bearer, make_key, serve_app, wait_until

# --- the look-up cache, on the real key table -------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_authenticator_caches_look_ups_and_keeps_stale_entries_when_postgres_fails(
    settings: Settings,
) -> None:
    async with open_corpus(settings) as corpus:
        store = KeyStore(corpus.pool)
        token, key = await store.create("svc", "query", rpm=60)
        known_token, _ = await store.create("other", "admin")
        looked_up: list[str] = []
        broken = False

        async def lookup(key_id: str) -> ApiKey | None:
            looked_up.append(key_id)
            if broken:
                raise asyncpg.InterfaceError("pool is closed")
            return await store.get(key_id)

        clock = Clock()
        auth = Authenticator(lookup, ttl_s=10, clock=clock)
        principal = await auth.authenticate(token)
        assert principal is not None and principal.key_id == key.id and principal.scopes == ("query",)
        assert principal.rpm == 60
        assert await auth.authenticate(token) == principal
        assert looked_up == [key.id]  # the second request needed no SQL

        clock.now = 11  # past the TTL: asked again
        assert await auth.authenticate(token) == principal and looked_up == [key.id, key.id]

        broken = True
        clock.now = 30
        assert await auth.authenticate(token) == principal  # stale beats unavailable
        with pytest.raises(AuthUnavailable):
            await auth.authenticate(known_token)  # never seen: cannot tell
        assert await auth.authenticate("not a key") is None  # malformed keys never reach Postgres


# --- over HTTP ------------------------------------------------------------------------------------


async def test_keys_and_scopes_over_http(settings: Settings, local_embedder: LocalEmbedder) -> None:
    await seed(settings, local_embedder)
    query_key = await make_key(settings, "query")
    admin_key = await make_key(settings, "admin")
    async with running(settings, local_embedder, key=query_key) as http:
        assert (await ask(http)).status == 200
        missing = await http.post("/rag/stream", json={"question": "hi"}, headers={"Authorization": ""})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await http.post("/rag/answer", json={"question": "hi"}, headers=bearer(query_key[:-2] + "xx"))
        assert wrong.status_code == 401 and "unknown or revoked" in wrong.json()["error"]["message"]
        basic = await http.post("/rag/answer", json={"question": "hi"}, headers={"Authorization": "Basic Zm9vOmJhcg=="})
        assert basic.status_code == 401
        # the query scope cannot read the dashboard's data; admin can, and admin may also ask questions
        forbidden = await http.get("/dashboard/api/summary")
        assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
        assert (await http.get("/dashboard/api/summary", headers=bearer(admin_key))).status_code == 200
        # An admin key reads every collection (`*`), a query key only `default`: different permission
        # sets never share an answer (issue 13), so the admin's first ask is its own miss, then a hit.
        assert (await ask(http, headers=bearer(admin_key))).meta["cache"] == "miss"
        assert (await ask(http, headers=bearer(admin_key))).meta["cache"] == "hit"
        # liveness and readiness stay open for orchestrators
        assert (await http.get("/health", headers={"Authorization": ""})).status_code == 200
        assert (await http.get("/ready", headers={"Authorization": ""})).status_code == 200


async def test_revocation_reaches_a_running_server_at_once(settings: Settings, local_embedder: LocalEmbedder) -> None:
    """A TTL of an hour, so only the NOTIFY can explain the key being refused."""
    settings = settings.model_copy(update={"auth_cache_ttl_s": 3600})
    await seed(settings, local_embedder)
    token = await make_key(settings, "query")
    key_id = (parse_key(token) or ("", ""))[0]
    async with (
        serve_app(create_app(settings, embedder=local_embedder)) as url,
        httpx.AsyncClient(base_url=url, headers=bearer(token), timeout=30) as http,
    ):
        assert (await ask(http)).status == 200
        async with open_corpus(settings) as corpus:
            assert await KeyStore(corpus.pool).revoke(key_id)

        async def refused() -> bool:
            return (await http.post("/rag/answer", json={"question": "How do I flush the cache?"})).status_code == 401

        await wait_until(refused, within=5)


# --- rag-admin keys ------------------------------------------------------------------------------


def test_rag_admin_keys_create_list_revoke(cli: CliRunner, settings: Settings) -> None:
    created = cli.invoke(admin_app, ["keys", "create", "--name", "ci bot", "--scope", "admin", "--rpm", "30", "--json"])
    assert created.exit_code == 0, created.output
    made = json.loads(created.stdout)
    assert parse_key(made["key"]) is not None and made["key"].split("_")[1] == made["id"]
    assert made["scopes"] == ["query", "admin"] and made["rpm"] == 30 and made["tokens_per_day"] is None

    plain = cli.invoke(admin_app, ["keys", "create", "--name", "reader"])
    assert plain.exit_code == 0 and parse_key(plain.stdout.strip()) is not None  # only the key on stdout

    listed = cli.invoke(admin_app, ["keys", "list", "--json"])
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["ci bot", "reader"]
    assert made["key"] not in listed.stdout and made["key"].rsplit("_", 1)[1] not in listed.stdout
    assert "ci bot" in cli.invoke(admin_app, ["keys", "list"]).stdout

    revoked = cli.invoke(admin_app, ["keys", "revoke", made["id"]])
    assert revoked.exit_code == 0 and made["id"] in revoked.stdout
    assert [r["name"] for r in json.loads(cli.invoke(admin_app, ["keys", "list", "--json"]).stdout)] == ["reader"]
    everything = json.loads(cli.invoke(admin_app, ["keys", "list", "--all", "--json"]).stdout)
    assert [r["revoked_at"] is not None for r in everything] == [True, False]
    again = cli.invoke(admin_app, ["keys", "revoke", made["id"]])
    assert again.exit_code == 1 and "no active key" in again.output

    async def stored_hash_only() -> None:
        async with open_corpus(settings) as corpus:
            row = await corpus.pool.fetchrow("SELECT * FROM api_keys WHERE id = $1", made["id"])
            assert row is not None and made["key"].encode() not in bytes(row["secret_sha256"])
            assert len(row["secret_sha256"]) == 32

    asyncio.run(stored_hash_only())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "create", "--name", "x", "--scope", "root"], "--scope must be query or admin"),
        (["keys", "create", "--name", "  "], "--name must not be empty"),
        (["keys", "create", "--name", "x", "--rpm", "0"], "--rpm"),
    ],
)
def test_rag_admin_keys_create_refuses_bad_options(cli: CliRunner, args: list[str], message: str) -> None:
    result = cli.invoke(admin_app, args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
