"""The SSE framing /rag/stream writes: byte for byte what sse-starlette would send."""

from __future__ import annotations

from service.answer.events import Done, Token
from service.answer.schemas import UsageInfo
from service.http.rag import sse_bytes, sse_event
from tests.support.sse import parse_sse


def test_sse_bytes_are_what_sse_starlette_would_send() -> None:
    usage = UsageInfo(input_tokens=1, output_tokens=2, cost_usd=0.0)
    for event in (Token('line\nbreak "quoted" ünïcode\r\n'), Done(usage, 1.5, None, True)):
        assert sse_bytes(event) == sse_event(event).encode()
        assert parse_sse(sse_bytes(event).decode())[0][1] == parse_sse(sse_event(event).encode().decode())[0][1]
