"""`/docs`: Swagger UI from the swagger-ui-bundle-v2 package, under a strict Content-Security-Policy.

Admins paste keys into "Authorize", so the page loads nothing from elsewhere: FastAPI's
default page pulls an unpinned Swagger UI from a CDN without integrity checks. Here the
script and stylesheet come from the installed package (pinned with the other dependencies),
the one inline script is allowed by its hash, and the CSP allows no other origin at all.
Off unless RAG_DOCS is true (`make run` turns it on); /openapi.json is served either way.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def _assets_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(swagger_ui_path)


def docs_page(openapi_url: str, title: str) -> tuple[bytes, str]:
    """The page and its Content-Security-Policy (which names the hash of each inline script)."""
    page = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=title,
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="data:,",
        oauth2_redirect_url=None,
        # No badge fetched from validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": False},
    )
    body = bytes(page.body)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(body)
    )
    csp = (
        "default-src 'none'; "
        f"script-src 'self' {hashes}; "
        # Swagger UI sets style attributes at run time; styles cannot run code.
        "style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return body, csp


def install_docs(app: FastAPI) -> None:
    assets = _assets_dir()
    body, csp = docs_page(app.openapi_url or "/openapi.json", f"{app.title} API")
    headers = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(body, headers=headers)

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in ASSETS:
            return Response(status_code=404)
        return FileResponse(assets / name, media_type=ASSETS[name], headers={"X-Content-Type-Options": "nosniff"})
