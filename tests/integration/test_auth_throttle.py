"""The failed-authentication limit over real HTTP (issue 12, finding 3).

The three cases the review demonstrated: a valid key from an address that failed too often
got 429; the same key with a made-up `X-Forwarded-For` passed; bad keys with a fresh
`X-Forwarded-For` each were never limited, because uvicorn believed the header from loopback.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import uvicorn

from service.embeddings.encoders import LocalEmbedder
from service.http.app import create_app
from service.http.proxies import throttle_address, uvicorn_proxy_options
from service.settings import Settings
from tests.support.servers import bearer, make_key, make_settings, serve_app

LIMIT = 3
BAD = bearer("rck_abcdefghijkl_" + "x" * 43)


async def _status(http: httpx.AsyncClient, headers: dict[str, str]) -> int:
    return (await http.get("/v1/models", headers=headers)).status_code


async def test_a_valid_key_is_never_blocked_by_failures_from_its_address(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    settings = settings.model_copy(update={"auth_failures_per_minute": LIMIT})
    good = await make_key(settings, "query")  # never used before: the worker must ask Postgres
    async with serve_app(create_app(settings, embedder=local_embedder)) as url, httpx.AsyncClient(base_url=url) as http:
        statuses = [await _status(http, BAD) for _ in range(LIMIT + 2)]
        assert statuses == [401] * LIMIT + [429] * 2
        assert await _status(http, bearer(good)) == 200
        assert await _status(http, {**bearer(good), "X-Forwarded-For": "10.9.8.77"}) == 200
        assert await _status(http, BAD) == 429  # successes do not reset the count of failures


async def test_forwarded_for_is_ignored_without_trusted_proxies(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    settings = settings.model_copy(update={"auth_failures_per_minute": LIMIT})
    async with serve_app(create_app(settings, embedder=local_embedder)) as url, httpx.AsyncClient(base_url=url) as http:
        statuses = [await _status(http, {**BAD, "X-Forwarded-For": f"10.0.0.{n}"}) for n in range(LIMIT + 3)]
    assert statuses == [401] * LIMIT + [429] * 3  # one peer, one count, whatever the header says


async def test_a_trusted_proxy_reports_the_client(settings: Settings, local_embedder: LocalEmbedder) -> None:
    settings = settings.model_copy(update={"auth_failures_per_minute": LIMIT, "trusted_proxies": "127.0.0.1"})
    good = await make_key(settings, "query")
    async with serve_app(create_app(settings, embedder=local_embedder)) as url, httpx.AsyncClient(base_url=url) as http:
        one = {**BAD, "X-Forwarded-For": "203.0.113.7"}
        assert [await _status(http, one) for _ in range(LIMIT + 1)] == [401] * LIMIT + [429]
        # another client behind the same proxy has a count of its own
        assert await _status(http, {**BAD, "X-Forwarded-For": "203.0.113.8"}) == 401
        # and a client can only prepend to the chain: the proxy's own entry decides
        spoofed = {**BAD, "X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
        assert await _status(http, spoofed) == 429
        assert await _status(http, {**bearer(good), "X-Forwarded-For": "203.0.113.7"}) == 200


def test_settings_reject_malformed_proxies(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an address or network"):
        make_settings("postgresql://x/y", "redis://x", tmp_path, trusted_proxies="10.0.0.1,proxy.example")


def test_rag_serve_uvicorn_options_follow_the_setting(tmp_path: Path) -> None:
    """uvicorn's default (trust loopback) is never what rag-serve runs with."""

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("not called")

    for proxies, wrapped in (("", False), ("10.0.0.0/8, 127.0.0.1", True)):
        settings = make_settings("postgresql://x/y", "redis://x", tmp_path, trusted_proxies=proxies)
        config = uvicorn.Config(app, **uvicorn_proxy_options(settings))
        config.load()
        assert ("ProxyHeadersMiddleware" in repr(config.loaded_app)) is wrapped, repr(config.loaded_app)


@pytest.mark.parametrize(
    ("host", "counted_as"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same /64: one count
        ("::ffff:203.0.113.7", "203.0.113.7"),
        (None, "unknown"),
    ],
)
def test_throttle_counts_ipv4_addresses_and_ipv6_slash_64s(host: str | None, counted_as: str) -> None:
    assert throttle_address(host) == counted_as
