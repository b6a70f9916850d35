"""The one Server-Sent Events parser for tests and benchmarks."""

from __future__ import annotations

import json
from collections.abc import Container
from typing import Any


def parse_sse(raw: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


def parse_sse_bytes(body: bytes, *, skip: Container[str] = ()) -> list[tuple[str, dict[str, Any]]]:
    """`parse_sse` over raw bytes, split on b"\\n" only (answers may hold characters str.splitlines() splits on).

    Events named in `skip` keep their name but not their data (no JSON decoding): a cheap count of tokens.
    """
    events: list[tuple[str, dict[str, Any]]] = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = "message", []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
        if data:
            events.append((name, {} if name in skip else json.loads(b"\n".join(data))))
    return events


def first_event(body: bytes) -> tuple[str, dict[str, Any]] | None:
    """The first event of an SSE body, without reading the rest."""
    head = body.split(b"\n\n", 1)[0]
    parsed = parse_sse_bytes(head)
    return parsed[0] if parsed else None
