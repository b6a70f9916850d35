"""tests.support.load: the benchmarks' HTTP/1.1 client against a loopback server that speaks raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tests.support.load import Client, fetch

SSE = (
    b'event: meta\ndata: {"cache": "miss"}\n\n',
    b'event: token\ndata: {"text": "Hel"}\n\n',
    b'event: token\ndata: {"text": "lo\\u2028"}\n\n',
    b'event: done\ndata: {"ttft_ms": 12.5}\n\n',
)


@asynccontextmanager
async def raw_server(connections: list[int]) -> AsyncIterator[str]:
    """Answers POST /sse with a chunked event stream, anything else with a JSON 429; counts connections."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        with contextlib.suppress(asyncio.IncompleteReadError):  # the client closed its connection
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(x[15:]) for x in head.lower().split(b"\r\n") if x.startswith(b"content-length:"))
                await reader.readexactly(length)
                if head.startswith(b"POST /sse"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
                    writer.write(b"transfer-encoding: chunked\r\n\r\n")
                    for event in SSE:
                        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                else:
                    body = b'{"error": {"code": "rate_limited", "message": "slow down"}}'
                    writer.write(b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n")
                    writer.write(b"retry-after: 3\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                if b"connection: close" in head.lower():
                    break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def test_a_chunked_event_stream_is_read_whole_and_parsed() -> None:
    async with raw_server([]) as url:
        reply = await fetch(url, "POST", "/sse", {"question": "q"})
    assert reply.ok and reply.status == 200
    assert reply.outcome == "miss"
    assert reply.tokens == 2
    assert reply.text == "Hello\u2028"  # split on b"\n" only: U+2028 stays inside the token
    assert reply.server_ttft_ms == 12.5
    assert 0 <= reply.ttft_s <= reply.total_s


async def test_requests_reuse_one_keep_alive_connection() -> None:
    connections: list[int] = []
    async with raw_server(connections) as url:
        client = Client(url)
        replies = [await client.request("POST", "/sse", {"question": str(i)}) for i in range(3)]
        client.close()
    assert [r.outcome for r in replies] == ["miss"] * 3
    assert len(connections) == 1


async def test_an_http_error_keeps_its_code_and_retry_after() -> None:
    async with raw_server([]) as url:
        reply = await fetch(url, "POST", "/other", {"question": "q"})
    assert not reply.ok
    assert reply.outcome == "http:429:rate_limited"
    assert reply.retry_after == "3"
    assert math.isnan(reply.ttft_s)


async def test_a_refused_connection_is_a_client_error_not_an_exception() -> None:
    async with raw_server([]) as url:
        pass  # closed: nothing listens on the port any more
    reply = await fetch(url, "GET", "/health", limit_s=2)
    assert reply.status == 0 and not reply.ok
    assert reply.outcome.startswith("client:")
