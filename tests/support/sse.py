"""The one Server-Sent Events parser for tests and benchmarks.

`/rag/stream` sends named events (`event: meta`, `event: token`, ...) with JSON data;
`/v1/chat/completions` sends unnamed `data:` messages ending with `data: [DONE]`.
Everything here reads both through `_Framer`, one implementation of the framing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Container, Iterable, Iterator
from typing import Any

DONE = "[DONE]"  # the OpenAI stream's last data line, not JSON


class _Framer:
    """Feeds lines, hands back (event name, data) when a blank line ends a message."""

    def __init__(self) -> None:
        self.name = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        line = line.rstrip("\r")
        if line.startswith("event:"):
            self.name = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].strip())
        elif not line:
            return self.flush()
        return None

    def flush(self) -> tuple[str, str] | None:
        message = (self.name, "\n".join(self.data)) if self.data else None
        self.name, self.data = "message", []
        return message


def sse_messages(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event name, raw data) per message; a message without `event:` is named "message"."""
    framer = _Framer()
    for line in lines:
        if message := framer.feed(line):
            yield message
    if message := framer.flush():
        yield message


def parse_sse(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """A whole `/rag/stream` body: (event name, JSON data) per event."""
    return [(name, json.loads(data)) for name, data in sse_messages(raw.replace("\r\n", "\n").split("\n"))]


def parse_sse_bytes(body: bytes, *, skip: Container[str] = ()) -> list[tuple[str, dict[str, Any]]]:
    """`parse_sse` over raw bytes. Events named in `skip` keep their name but not their data (no JSON
    decoding): a cheap count of tokens for the load benchmarks."""
    lines = body.decode().replace("\r\n", "\n").split("\n")
    return [(name, {} if name in skip else json.loads(data)) for name, data in sse_messages(lines)]


def first_event(body: bytes) -> tuple[str, dict[str, Any]] | None:
    """The first event of an SSE body, without reading the rest."""
    parsed = parse_sse_bytes(body.split(b"\n\n", 1)[0])
    return parsed[0] if parsed else None


def parse_chat_sse(raw: str) -> list[dict[str, Any]]:
    """A whole streamed `/v1/chat/completions` body: its JSON chunks; fails unless it ends with `data: [DONE]`."""
    data = [data for _, data in sse_messages(raw.replace("\r\n", "\n").split("\n"))]
    assert data and data[-1] == DONE, f"the stream does not end with data: {DONE}"
    return [json.loads(item) for item in data[:-1]]


async def aiter_sse(lines: AsyncIterable[str]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Events as they arrive, from `httpx.Response.aiter_lines()`: a test can hang up after any of them."""
    framer = _Framer()
    async for line in lines:
        if message := framer.feed(line):
            yield message[0], json.loads(message[1])
    if message := framer.flush():
        yield message[0], json.loads(message[1])
