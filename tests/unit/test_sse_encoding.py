"""SSE framing: what /rag/stream writes (what sse-starlette would send), and the kit parser that reads it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.answer.events import Done, Token
from service.answer.schemas import UsageInfo
from service.http.rag import sse_bytes, sse_event
from tests.support.sse import aiter_sse, parse_chat_sse, parse_sse


def test_sse_bytes_are_what_sse_starlette_would_send() -> None:
    usage = UsageInfo(input_tokens=1, output_tokens=2, cost_usd=0.0)
    for event in (Token('line\nbreak "quoted" ünïcode\r\n'), Done(usage, 1.5, None, True)):
        assert sse_bytes(event) == sse_event(event).encode()
        assert parse_sse(sse_bytes(event).decode())[0][1] == parse_sse(sse_event(event).encode().decode())[0][1]


async def test_the_kit_parser_reads_whole_bodies_and_streams_alike() -> None:
    usage = UsageInfo(input_tokens=1, output_tokens=2, cost_usd=0.0)
    body = b"".join(sse_bytes(e) for e in (Token("a\r\nb"), Token("c"), Done(usage, 1.5, None, True))).decode()

    async def lines() -> AsyncIterator[str]:
        for line in body.split("\n"):
            yield line

    whole = parse_sse(body)
    assert [name for name, _ in whole] == ["token", "token", "done"] and whole[0][1]["text"] == "a\r\nb"
    assert [event async for event in aiter_sse(lines())] == whole


def test_the_kit_parser_reads_chat_chunks_only_up_to_done() -> None:
    body = 'data: {"n": 1}\r\n\r\ndata: {"n": 2}\n\ndata: [DONE]\n\n'
    assert parse_chat_sse(body) == [{"n": 1}, {"n": 2}]
    with pytest.raises(AssertionError, match="DONE"):
        parse_chat_sse('data: {"n": 1}\n\n')  # cut short: no end marker
