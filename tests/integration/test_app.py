"""The app factory, lifespan and the ops endpoints over a real HTTP server."""

from __future__ import annotations

from pathlib import Path

import httpx

from service.embeddings.encoders import LocalEmbedder
from service.http.app import create_app
from service.settings import Settings
from tests.support.servers import make_settings, serve_app


async def test_health_and_ready_with_all_dependencies_up(settings: Settings, local_embedder: LocalEmbedder) -> None:
    async with serve_app(create_app(settings, embedder=local_embedder)) as url, httpx.AsyncClient(base_url=url) as http:
        health = await http.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = await http.get("/ready")
        body = ready.json()
        assert ready.status_code == 200, body
        assert body["status"] == "ready"
        assert body["checks"]["postgres"]["ok"] and body["checks"]["postgres"]["documents"] == 0
        assert body["checks"]["redis"]["ok"]
        assert body["checks"]["embedder"] == {"ok": True, "model": local_embedder.model, "dim": 384}


async def test_ready_reports_degraded_when_redis_is_unreachable(
    database_url: str, tmp_path: Path, local_embedder: LocalEmbedder
) -> None:
    settings = make_settings(database_url, "redis://127.0.0.1:1/0", tmp_path)  # nothing listens on port 1
    async with serve_app(create_app(settings, embedder=local_embedder)) as url, httpx.AsyncClient(base_url=url) as http:
        ready = await http.get("/ready")
        body = ready.json()
        assert ready.status_code == 200
        assert body["status"] == "degraded"
        assert body["checks"]["redis"]["ok"] is False and body["checks"]["postgres"]["ok"] is True


async def test_unknown_route_uses_the_error_shape(settings: Settings, local_embedder: LocalEmbedder) -> None:
    async with serve_app(create_app(settings, embedder=local_embedder)) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/nope")
        assert response.status_code == 404
        assert response.json() == {"error": {"code": "not_found", "message": "Not Found"}}
