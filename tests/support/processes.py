"""A server under test as a process of its own: a clean environment, started until GET /health answers, stopped after.

Benchmarks start `rag-serve` and uvicorn this way (bench/_kit.ReplayStack.serve, bench/hit_path).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.load import fetch

# The environment variables that are service settings (service/settings.py reads them).
SETTING_PREFIXES = ("RAG_", "OPENAI_", "ANTHROPIC_", "DATABASE_URL", "REDIS_URL")


def is_setting(name: str) -> bool:
    return name.startswith(SETTING_PREFIXES)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus every service setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not is_setting(k)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env | {"PYTHONUNBUFFERED": "1"} | extra


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


@asynccontextmanager
async def serve_process(command: str, port: int, env: dict[str, str], log: Path, cwd: Path) -> AsyncIterator[Served]:
    """`command` (split on spaces) as a process of its own, until GET /health answers on `port`; stopped after."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        proc = subprocess.Popen(command.split(), env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)  # noqa: ASYNC220
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
    try:
        while (await fetch(url, "GET", "/health", limit_s=2)).status != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{command.split()[0]} did not start (exit {proc.poll()}); see {log}")
            await asyncio.sleep(0.2)
        yield Served(url, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
