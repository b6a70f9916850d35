"""A real `rag-serve` on its own embedded servers (issue 12, findings 9 and 11): a client that
sends its headers one byte at a time is cut off, and SIGTERM stops Postgres and Valkey too."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.servers import BIN, ROOT, wait_until

# Starting rag-serve (initdb, the embedding model) takes minutes on a loaded machine.
pytestmark = pytest.mark.timeout(600)


@dataclass
class Serving:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def embedded_server_pids(data_dir: Path) -> dict[str, int]:
    """The embedded Postgres (postmaster.pid) and Valkey (its socket is in its process title)."""
    pids = {"postgres": int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])}
    title = f"unixsocket:{data_dir.resolve() / 'valkey' / 'valkey.sock'}"
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if title in " ".join(proc.info["cmdline"] or []):
            pids["valkey"] = proc.info["pid"]
    return pids


def running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def serving() -> Iterator[Serving]:
    # Not under pytest's basetemp (see tests/conftest.py): as root, embedded Postgres runs as
    # another user that must reach the data directory.
    data_dir = Path(tempfile.mkdtemp(prefix="ragcache-test-serve-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "OPENAI_", "ANTHROPIC_"))}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(
        RAG_DATA_DIR=str(data_dir),
        RAG_PORT=str(port),
        RAG_LOG_LEVEL="warning",
        RAG_HTTP_HEADER_TIMEOUT_S="1",
        HF_HUB_OFFLINE="1",
    )
    proc = subprocess.Popen([BIN / "rag-serve"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def up() -> bool:
        if proc.poll() is not None:
            assert proc.stderr is not None
            raise AssertionError(f"rag-serve exited: {proc.stderr.read().decode()}")
        return await asyncio.to_thread(healthy, port)

    pids: dict[str, int] = {}
    try:
        asyncio.run(wait_until(up, within=400, interval=0.2))
        pids = embedded_server_pids(data_dir)
        yield Serving(proc, port, data_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # Whatever a failed test left running of our own embedded servers, by pid.
        with contextlib.suppress(Exception):
            pids = pids or embedded_server_pids(data_dir)
        for pid in pids.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_a_client_sending_headers_byte_by_byte_is_closed(serving: Serving) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", serving.port)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    closed = asyncio.Event()

    async def watch() -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()  # returns at EOF: the server closed the connection
        closed.set()

    async def trickle() -> None:  # the attack: a header byte every 0.2 s, never the blank line
        with contextlib.suppress(ConnectionError):
            for byte in request:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.2)

    watching, trickling = asyncio.create_task(watch()), asyncio.create_task(trickle())
    try:
        await wait_until(closed.is_set, within=20)  # RAG_HTTP_HEADER_TIMEOUT_S=1
    finally:
        trickling.cancel()
        watching.cancel()
        writer.close()
    # An ordinary client is served as before.
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"http://127.0.0.1:{serving.port}/health")).status_code == 200


async def test_sigterm_stops_the_embedded_servers(serving: Serving) -> None:
    pids = embedded_server_pids(serving.data_dir)
    assert set(pids) == {"postgres", "valkey"} and all(running(pid) for pid in pids.values())

    serving.proc.send_signal(signal.SIGTERM)

    await wait_until(lambda: serving.proc.poll() is not None, within=60)
    # Before the fix: rag-serve died of the re-raised SIGTERM (-15) and both servers ran on.
    await wait_until(lambda: not any(running(pid) for pid in pids.values()), within=30)
    assert serving.proc.returncode == 128 + signal.SIGTERM  # an exit that unwound, with the usual code
