"""`GET /metrics` (Prometheus) and the cache dashboard: `GET /dashboard` plus its JSON API.

The page is static HTML, CSS and one vanilla JavaScript file under `service/http/static/`,
which draws its charts as SVG from `/dashboard/api/summary` and `/dashboard/api/series`.
Nothing is loaded from elsewhere, so it works offline, and no inline script or style is
needed, so the Content-Security-Policy can forbid both.

The page and its assets hold no data and are public; the JSON API needs an admin key,
which the page asks for once and keeps in the tab's sessionStorage (a browser cannot put
a bearer token on a page navigation). It shows only counts and question hashes, never user
text. `/metrics` needs an admin key too, unless RAG_METRICS_PUBLIC is set (for a scraper on
a private network).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.responses import Response

from service.http.auth import bearer as _bearer
from service.http.auth import requires
from service.http.responses import AUTH, error_responses
from service.observability.metrics import Metrics
from service.observability.prometheus import CONTENT_TYPE, PrometheusMetrics

router = APIRouter()
admin = [Depends(requires("admin"))]

STATIC_DIR = Path(__file__).resolve().parent / "static"
# range -> (minutes, minutes per chart row): about 60-170 rows whatever the range.
RANGES: dict[str, tuple[int, int]] = {"1h": (60, 1), "24h": (24 * 60, 15), "7d": (7 * 24 * 60, 60)}
Range = Literal["1h", "24h", "7d"]

SECURITY_HEADERS = {
    # Everything comes from this origin; no inline script or style, no framing, no plugins.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
}


def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.resources.metrics
    return metrics


def _json(data: dict[str, Any]) -> JSONResponse:
    return JSONResponse(data, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})


_admin_principal = requires("admin")


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=Response,
    responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}, **error_responses(*AUTH)},
)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus exposition; sums every worker when PROMETHEUS_MULTIPROC_DIR is set.

    Needs an admin key (Prometheus sends one with `authorization: {credentials: ...}`)
    unless RAG_METRICS_PUBLIC is set.
    """
    if not request.app.state.settings.metrics_public:
        credentials = await _bearer(request)
        await _admin_principal(request, credentials)
    prometheus: PrometheusMetrics = request.app.state.prometheus
    return Response(
        prometheus.exposition(),
        media_type=CONTENT_TYPE,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


@router.get(
    "/dashboard",
    tags=["dashboard"],
    response_class=FileResponse,
    responses={200: {"description": "The dashboard page", "content": {"text/html": {}}}},
)
async def dashboard() -> FileResponse:
    """The dashboard page (static HTML; its script fetches the JSON below)."""
    return FileResponse(
        STATIC_DIR / "dashboard.html",
        media_type=_STATIC_TYPES[".html"],
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


@router.get("/dashboard/static/{name}", tags=["dashboard"], include_in_schema=False)
async def dashboard_asset(name: str) -> FileResponse:
    """Only the files that ship in service/http/static, by exact name (no paths, no traversal)."""
    path = STATIC_DIR / name
    if "/" in name or "\\" in name or name.startswith(".") or path.suffix not in _STATIC_TYPES or not path.is_file():
        raise HTTPException(404, "not found")
    # no-cache still lets the browser revalidate with the ETag FileResponse sets (304s).
    return FileResponse(
        path, media_type=_STATIC_TYPES[path.suffix], headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    )


@router.get("/dashboard/api/summary", tags=["dashboard"], dependencies=admin, responses=error_responses(*AUTH, 422))
async def dashboard_summary(request: Request, range_: Annotated[Range, Query(alias="range")] = "1h") -> JSONResponse:
    """Totals for the range across all workers: outcomes, hit ratios, savings, TTFT, routes, blocks, top questions."""
    minutes, _ = RANGES[range_]
    summary = await _metrics(request).summary(minutes=minutes)
    return _json({"range": range_, "generated_at": time.time(), **summary})


@router.get("/dashboard/api/series", tags=["dashboard"], dependencies=admin, responses=error_responses(*AUTH, 422))
async def dashboard_series(request: Request, range_: Annotated[Range, Query(alias="range")] = "1h") -> JSONResponse:
    """Rows over the range (1 min for 1h, 15 min for 24h, 1 h for 7d), oldest first, zero-filled."""
    minutes, step = RANGES[range_]
    rows = await _metrics(request).series(minutes=minutes, step=step)
    return _json({"range": range_, "step_s": step * 60, "generated_at": time.time(), "rows": rows})
