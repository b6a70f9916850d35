"""A tiny TCP proxy in front of a real Redis/Valkey (TCP or unix socket), that can hold its replies back.

Requests always go through at once (the server runs them); while `hold()` is in effect, what the
server answers waits in the proxy, so a test can act -- cancel a task, say -- between a command
having run and its client hearing so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qs, urlsplit


class ReplyHoldingProxy:
    def __init__(self, redis_url: str) -> None:
        self.upstream = urlsplit(redis_url)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """A URL for the same server and database, through this proxy."""
        up = self.upstream
        auth = up.netloc.rsplit("@", 1)[0] + "@" if "@" in up.netloc else ""
        db = parse_qs(up.query).get("db", ["0"])[0] if up.scheme == "unix" else (up.path.strip("/") or "0")
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        up = self.upstream
        if up.scheme == "unix":
            return await asyncio.open_unix_connection(up.path)
        assert up.hostname is not None
        return await asyncio.open_connection(up.hostname, up.port or 6379)

    def hold(self) -> None:
        self.flowing.clear()

    def release(self) -> None:
        self.flowing.set()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool) -> None:
        try:
            while data := await reader.read(65536):
                if replies:
                    await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await self._open_upstream()
        for task in (
            asyncio.create_task(self._pump(client_reader, server_writer, replies=False)),
            asyncio.create_task(self._pump(server_reader, client_writer, replies=True)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ReplyHoldingProxy]:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self.release()
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
