"""`/docs` (issue 12, finding 10): Swagger UI from the installed package under a strict CSP,
never from a CDN; off unless RAG_DOCS. Checked in a real Chromium: the page must render
the API's operations with no request leaving the server and no CSP violation."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from service.embeddings.encoders import LocalEmbedder
from service.http.app import create_app
from service.settings import Settings
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.servers import make_settings, serve_app


def with_docs(settings: Settings, on: bool) -> Settings:
    return make_settings(str(settings.database_url), str(settings.redis_url), settings.data_dir, docs=on)


async def test_docs_are_off_unless_enabled(settings: Settings, local_embedder: LocalEmbedder) -> None:
    app = create_app(with_docs(settings, False), embedder=local_embedder)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/docs")).status_code == 404
        assert (await http.get("/redoc")).status_code == 404
        assert (await http.get("/openapi.json")).status_code == 200  # clients still get the schema


async def test_docs_load_only_local_assets_under_a_strict_csp(
    settings: Settings, local_embedder: LocalEmbedder
) -> None:
    app = create_app(with_docs(settings, True), embedder=local_embedder)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as http:
        page = await http.get("/docs")
        assert page.status_code == 200
        html = page.text
        csp = page.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'none'"
        assert directives["frame-ancestors"] == "'none'"
        assert "http" not in csp and "*" not in csp and "unsafe-eval" not in csp
        assert "'unsafe-inline'" not in directives["script-src"]
        # Every URL the page references is on this server (or a data: URL).
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", html) + re.findall(r"url:\s*'([^']+)'", html)
        assert urls
        for ref in urls:
            assert ref.startswith("data:") or not urlsplit(ref).netloc, ref
        for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
            assert asset in html
            fetched = await http.get(asset)
            assert fetched.status_code == 200 and len(fetched.content) > 10_000, asset
        assert (await http.get("/docs/assets/index.html")).status_code == 404  # only the two files
        assert (await http.get("/docs/assets/..%2F..%2F__init__.py")).status_code == 404


@pytest.fixture
def chromium() -> str:
    """Debian's chromium; `make test` installs it. Missing is a failure, never a silent skip."""
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (make test installs it with apt-get)")
    return CHROMIUM


async def test_docs_render_in_chromium_without_leaving_the_server(
    settings: Settings, local_embedder: LocalEmbedder, chromium: str
) -> None:
    from playwright.async_api import async_playwright

    app = create_app(with_docs(settings, True), embedder=local_embedder)
    problems: list[str] = []
    requested: list[str] = []
    async with serve_app(app) as url, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: requested.append(r.url))
            await page.goto(f"{url}/docs")
            await page.wait_for_selector(".opblock-summary-path[data-path='/rag/stream']", timeout=30_000)
            await page.wait_for_selector("button.authorize")
        finally:
            await browser.close()
    assert problems == []
    assert requested and all(r.startswith(url) or r.startswith("data:") for r in requested), requested
