"""What `make run` does, for real: `rag-serve --ingest-examples --local-key` on its own embedded
servers prints a key and a curl that works as pasted, and keeps the same key across restarts."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.cli.serve import LOCAL_KEY_FILE
from tests.support.servers import BIN, ROOT, TEST_MODEL_DIR, free_port
from tests.support.sse import parse_sse


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def make_run(data_dir: Path) -> Iterator[tuple[str, str, int]]:
    """rag-serve as `make run` starts it; yields (printed key, printed curl, port) once it serves."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "OPENAI_", "ANTHROPIC_"))}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(RAG_DATA_DIR=str(data_dir), RAG_PORT=str(port), RAG_LOG_LEVEL="warning", HF_HUB_OFFLINE="1")
    env.update(RAG_LOG_FORMAT="console")  # as the Makefile's `run` target sets it
    env.update(RAG_MODEL_DIR=str(TEST_MODEL_DIR))  # the suite's ONNX export, not a fresh one per run
    proc = subprocess.Popen(
        [BIN / "rag-serve", "--ingest-examples", "--local-key"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        for line in proc.stderr:  # the banner comes before uvicorn starts
            lines.append(line)
            if line.strip().startswith("curl "):
                break
        banner = "".join(lines)
        key = re.search(r"admin API key \(kept in .*\): (\S+)", banner)
        assert key is not None, banner
        deadline = time.monotonic() + 60
        while not _healthy(port):
            if proc.poll() is not None:
                raise AssertionError(f"rag-serve exited: {banner}{proc.stderr.read()}")
            assert time.monotonic() < deadline, "rag-serve did not start serving within 60 s"
            time.sleep(0.1)  # polling a port that is not open yet
        yield key[1], lines[-1].strip(), port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_make_run_prints_a_working_key_and_curl(tmp_path: Path) -> None:
    with make_run(tmp_path) as (key, curl, port):
        assert key.startswith("rck_") and f"Bearer {key}" in curl and f":{port}/rag/stream" in curl
        out = subprocess.run([*shlex.split(curl), "--silent", "--max-time", "60"], capture_output=True, text=True)
        events = parse_sse(out.stdout)
        assert events[0][0] == "meta" and events[-1][0] == "done", out.stdout
        assert events[0][1]["sources"], "the examples were ingested and cited"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            auth = {"Authorization": f"Bearer {key}"}
            assert http.get("/dashboard/api/summary", headers=auth).status_code == 200  # an admin key
            assert http.post("/rag/answer", json={"question": "hi"}).status_code == 401
    stored = tmp_path / LOCAL_KEY_FILE
    assert stored.read_text().strip() == key and stored.stat().st_mode & 0o077 == 0
    with make_run(tmp_path) as (again, _, _):
        assert again == key  # the same key after a restart, still valid
