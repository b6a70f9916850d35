"""An API worker serves questions without torch, and with Anthropic configured without the `anthropic`
SDK: built from the settings alone, in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from service.settings import Settings
from tests.support.provider_server import ProviderServer
from tests.support.servers import ROOT, cli_env

# The app as rag-serve's workers build it (settings from the environment, default embedder),
# answering one question over real HTTP; then what got imported.
WORKER = """
import asyncio, json, sys
import httpx
from service.http.app import create_app
from service.settings import Settings
from tests.support.servers import bearer, make_key, serve_app

async def main() -> None:
    settings = Settings(_env_file=None)
    key = await make_key(settings, "query")
    app = create_app(settings)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=60, headers=bearer(key)) as http:
        reply = await http.post("/rag/stream", json={"question": "How do I flush the cache?"})
        embedder = app.state.resources.embedder
        imported = {name.split(".")[0] for name in sys.modules}
        heavy = {"torch", "transformers", "sentence_transformers"} & imported
        print(json.dumps({
            "status": reply.status_code,
            "embedder": type(embedder).__name__,
            "encodes": embedder.batcher.encodes,
            "heavy": sorted(heavy),
            "sdks": sorted({"anthropic", "openai"} & imported),
        }))

asyncio.run(main())
"""


def run_worker(settings: Settings, **env: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", WORKER],
        env=cli_env(settings, RAG_LOG_LEVEL="warning", **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_api_worker_embeds_questions_without_importing_torch(settings: Settings) -> None:
    result = run_worker(settings)
    assert result["status"] == 200
    assert result["embedder"] == "OnnxEmbedder" and result["encodes"] >= 1  # the question was embedded
    assert result["heavy"] == []  # no torch, transformers or sentence-transformers in the worker
    # No provider is configured here (cli_env drops ANTHROPIC_* and OPENAI_*), so neither SDK is
    # imported: `anthropic` alone is ~43 MB of a worker's RSS.
    assert result["sdks"] == []


def test_a_worker_answers_through_anthropic_without_importing_its_sdk(settings: Settings) -> None:
    with ProviderServer() as provider:
        result = run_worker(settings, ANTHROPIC_API_KEY="sk-ant-test", ANTHROPIC_BASE_URL=provider.base_url)
        answered = [c for c in provider.calls_to("messages") if c.status == 200]
    assert result["status"] == 200 and len(answered) == 1
    assert result["sdks"] == []  # the Messages API over httpx: no `anthropic` (~43 MB) in the worker
