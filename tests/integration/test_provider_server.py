"""The provider fixture speaks the real wire protocols: proven with the real SDKs.

Every test drives ``anthropic.AsyncAnthropic`` / ``openai.AsyncOpenAI`` against
:class:`ProviderServer` over loopback, so a passing test means the SDK itself
accepted the bytes (SSE framing, event shapes, error bodies, retry headers).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from tests.support.provider_server import Behavior, CallRecord, ProviderServer, default_answer, embed_text

ANSWER = "Paris is the capital of France [1]."
WORDS = ["Paris ", "is ", "the ", "capital ", "of ", "France ", "[1]."]
MODEL_A = "claude-haiku-4-5"
MODEL_O = "gpt-4o-mini"
PROMPT = "Context:\n[1] Paris is in France.\nWhat is the capital of France?"
A_MESSAGES: list[MessageParam] = [{"role": "user", "content": PROMPT}]
O_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]


@pytest.fixture
def server() -> Iterator[ProviderServer]:
    with ProviderServer(embedding_dim=64) as srv:
        yield srv


def error_type(error: anthropic.APIStatusError | openai.APIStatusError) -> str:
    """The `error.type` of a provider's JSON error body (the SDKs type the body as `object`)."""
    body = error.body
    assert isinstance(body, dict), body
    return str(body["error"]["type"])


def claude(server: ProviderServer, max_retries: int = 0, **kwargs: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.base_url, api_key="test", max_retries=max_retries, **kwargs)


def gpt(server: ProviderServer, max_retries: int = 0, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="test", max_retries=max_retries, **kwargs)


# ------------------------------------------------------------------ happy paths
@pytest.mark.asyncio
async def test_anthropic_stream_yields_text_and_usage(server: ProviderServer) -> None:
    server.enqueue(Behavior(text=ANSWER, input_tokens=42))
    async with (
        claude(server) as client,
        client.messages.stream(model=MODEL_A, max_tokens=256, messages=A_MESSAGES) as stream,
    ):
        pieces = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()

    assert pieces == WORDS  # one text_delta per word, not one blob
    assert final.content[0].type == "text" and final.content[0].text == ANSWER
    assert (final.usage.input_tokens, final.usage.output_tokens) == (42, len(WORDS))
    assert final.stop_reason == "end_turn" and final.model == MODEL_A

    call = server.last_call
    assert (call.provider, call.route, call.stream, call.completed) == ("anthropic", "messages", True, True)
    # Older SDKs send x-api-key, 2.x sends a bearer token: either way the key got through.
    assert "test" in (
        call.headers.get("x-api-key"),
        call.headers.get("authorization", "").removeprefix("Bearer "),
    )
    assert "anthropic-version" in call.headers
    assert call.body["messages"] == A_MESSAGES and call.body["max_tokens"] == 256
    assert call.tokens_sent == len(WORDS) and not call.disconnected and not call.dropped


@pytest.mark.asyncio
async def test_anthropic_default_answer_echoes_question_and_cites(server: ProviderServer) -> None:
    async with (
        claude(server) as client,
        client.messages.stream(model=MODEL_A, max_tokens=256, messages=A_MESSAGES) as stream,
    ):
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()

    assert text == default_answer({"messages": A_MESSAGES})
    assert "What is the capital of France?" in text and "[1]" in text
    assert final.usage.output_tokens == len(text.split())
    assert final.usage.input_tokens == len(PROMPT.split())


@pytest.mark.asyncio
async def test_anthropic_non_stream(server: ProviderServer) -> None:
    server.enqueue(Behavior(text=ANSWER, output_tokens=9))
    async with claude(server) as client:
        message = await client.messages.create(
            model=MODEL_A, max_tokens=256, system="Cite sources.", messages=A_MESSAGES
        )

    assert message.id.startswith("msg_") and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text == ANSWER
    assert message.usage.output_tokens == 9 and message.stop_reason == "end_turn"
    assert server.last_call.body["system"] == "Cite sources." and not server.last_call.stream


@pytest.mark.asyncio
async def test_anthropic_max_tokens_truncates_with_stop_reason(server: ProviderServer) -> None:
    server.enqueue(Behavior(text=ANSWER))
    async with (
        claude(server) as client,
        client.messages.stream(model=MODEL_A, max_tokens=3, messages=A_MESSAGES) as stream,
    ):
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "".join(WORDS[:3])
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3


@pytest.mark.asyncio
async def test_openai_stream_with_include_usage(server: ProviderServer) -> None:
    server.enqueue(Behavior(text=ANSWER, input_tokens=11))
    async with gpt(server) as client:
        stream = await client.chat.completions.create(
            model=MODEL_O, messages=O_MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]

    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == WORDS
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 7, 18)
    call = server.last_call
    assert call.provider == "openai" and call.headers["authorization"] == "Bearer test" and call.completed


@pytest.mark.asyncio
async def test_openai_stream_without_include_usage_has_no_usage(server: ProviderServer) -> None:
    server.enqueue(Behavior(text=ANSWER))
    async with gpt(server) as client:
        stream = await client.chat.completions.create(model=MODEL_O, messages=O_MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert all(c.usage is None for c in chunks)


@pytest.mark.asyncio
async def test_openai_non_stream(server: ProviderServer) -> None:
    server.enqueue(Behavior(text=ANSWER, input_tokens=5, output_tokens=6))
    async with gpt(server) as client:
        completion = await client.chat.completions.create(model=MODEL_O, messages=O_MESSAGES)
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop" and completion.model == MODEL_O
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 6)


@pytest.mark.asyncio
async def test_embeddings_are_deterministic_normalised_and_sized(server: ProviderServer) -> None:
    texts = ["alpha beta", "gamma", "alpha beta"]
    async with gpt(server) as client:
        first = await client.embeddings.create(model="text-embedding-3-small", input=texts)  # SDK asks base64
        floats = await client.embeddings.create(model="text-embedding-3-small", input=texts, encoding_format="float")
        single = await client.embeddings.create(model="text-embedding-3-small", input="gamma")
        small = await client.embeddings.create(model="text-embedding-3-small", input="gamma", dimensions=8)

    vectors = [d.embedding for d in first.data]
    assert [d.index for d in first.data] == [0, 1, 2]
    assert all(len(v) == 64 for v in vectors)
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-5) for v in vectors)
    assert vectors[0] != vectors[1]
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-6)
    assert vectors[1] == pytest.approx(single.data[0].embedding, abs=1e-6)  # stable across requests
    for as_float, as_base64 in zip(floats.data, vectors, strict=True):
        assert as_float.embedding == pytest.approx(as_base64, abs=1e-6)  # float32 round-trip
    assert floats.data[1].embedding == embed_text("gamma", 64)
    assert len(small.data[0].embedding) == 8
    assert first.usage.prompt_tokens == 5 and first.usage.total_tokens == 5
    assert [c.route for c in server.calls] == ["embeddings"] * 4


@pytest.mark.asyncio
async def test_models_list_for_both_sdks(server: ProviderServer) -> None:
    async with gpt(server) as ogpt, claude(server) as oclaude:
        openai_ids = [m.id async for m in ogpt.models.list()]
        anthropic_ids = [m.id async for m in oclaude.models.list()]
    assert openai_ids == anthropic_ids == server.models
    assert [c.provider for c in server.calls] == ["openai", "anthropic"]


# ------------------------------------------------------------------ error paths
@pytest.mark.asyncio
async def test_anthropic_529_is_overloaded_status_error(server: ProviderServer) -> None:
    server.enqueue(Behavior(status=529))
    async with claude(server) as client:
        with pytest.raises(anthropic.InternalServerError) as caught:
            async with client.messages.stream(model=MODEL_A, max_tokens=64, messages=A_MESSAGES) as stream:
                await stream.get_final_message()
    assert isinstance(caught.value, anthropic.APIStatusError) and caught.value.status_code == 529
    assert error_type(caught.value) == "overloaded_error"
    assert caught.value.request_id == f"req_fixture_{server.last_call.index:06d}"
    assert len(server.calls) == 1


@pytest.mark.asyncio
async def test_429_is_rate_limit_error_on_both_sdks(server: ProviderServer) -> None:
    server.enqueue(Behavior(status=429, retry_after=7), Behavior(status=429))
    async with claude(server) as aclient, gpt(server) as oclient:
        with pytest.raises(anthropic.RateLimitError) as a_err:
            await aclient.messages.create(model=MODEL_A, max_tokens=64, messages=A_MESSAGES)
        with pytest.raises(openai.RateLimitError) as o_err:
            await oclient.chat.completions.create(model=MODEL_O, messages=O_MESSAGES)
    assert a_err.value.status_code == 429 and a_err.value.response.headers["retry-after"] == "7"
    assert error_type(a_err.value) == "rate_limit_error"
    assert o_err.value.status_code == 429 and o_err.value.code == "rate_limit_exceeded"


@pytest.mark.asyncio
async def test_openai_503_is_internal_server_error(server: ProviderServer) -> None:
    server.enqueue(Behavior(status=503, error_message="down for maintenance"))
    async with gpt(server) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model=MODEL_O, messages=O_MESSAGES, stream=True)
    assert caught.value.status_code == 503 and "down for maintenance" in caught.value.message


@pytest.mark.asyncio
@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_sdk_retries_429_honouring_retry_after(server: ProviderServer, provider: str) -> None:
    # The SDKs' own first backoff is 0.375-0.5 s, so a gap of >= 0.6 s proves retry-after won.
    server.enqueue(Behavior(status=429, retry_after=0.6))  # then the default: success
    if provider == "anthropic":
        async with claude(server, max_retries=2) as aclient:
            message = await aclient.messages.create(model=MODEL_A, max_tokens=64, messages=A_MESSAGES)
        text = message.content[0].text if message.content[0].type == "text" else ""
    else:
        async with gpt(server, max_retries=2) as oclient:
            completion = await oclient.chat.completions.create(model=MODEL_O, messages=O_MESSAGES)
        text = completion.choices[0].message.content or ""

    assert text == default_answer({"messages": A_MESSAGES})
    first, second = server.calls
    assert (first.status, second.status) == (429, 200)
    assert first.headers["x-stainless-retry-count"] == "0" and second.headers["x-stainless-retry-count"] == "1"
    assert first.completed and first.headers_sent_at is not None
    assert second.started_at - first.headers_sent_at >= 0.6


@pytest.mark.asyncio
async def test_x_should_retry_false_stops_sdk_retries(server: ProviderServer) -> None:
    server.enqueue(Behavior(status=503, should_retry=False))
    async with claude(server, max_retries=2) as client:
        with pytest.raises(anthropic.InternalServerError):
            await client.messages.create(model=MODEL_A, max_tokens=64, messages=A_MESSAGES)
    assert len(server.calls) == 1


# --------------------------------------------------------- broken / slow streams
@pytest.mark.asyncio
async def test_drop_after_breaks_anthropic_stream_mid_way(server: ProviderServer) -> None:
    server.enqueue(Behavior(text=ANSWER, drop_after=3))
    received: list[str] = []
    async with claude(server) as client:
        # The Anthropic SDK lets transport errors out of a stream unwrapped.
        with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)) as caught:
            async with client.messages.stream(model=MODEL_A, max_tokens=256, messages=A_MESSAGES) as stream:
                async for piece in stream.text_stream:
                    received.append(piece)
    assert "incomplete chunked read" in str(caught.value)
    assert received == WORDS[:3]
    call = server.last_call
    assert call.dropped and not call.completed and call.tokens_sent == 3


@pytest.mark.asyncio
async def test_drop_after_breaks_openai_stream_mid_way(server: ProviderServer) -> None:
    server.enqueue(Behavior(text=ANSWER, drop_after=2))
    received: list[str] = []
    async with gpt(server) as client:
        stream = await client.chat.completions.create(model=MODEL_O, messages=O_MESSAGES, stream=True)
        with pytest.raises(openai.APIConnectionError):
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)
    assert received == WORDS[:2]
    assert server.last_call.dropped and not server.last_call.completed


@pytest.mark.asyncio
async def test_anthropic_in_stream_error_event(server: ProviderServer) -> None:
    server.enqueue(Behavior(text=ANSWER, error_after=2))
    received: list[str] = []
    async with claude(server) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with client.messages.stream(model=MODEL_A, max_tokens=256, messages=A_MESSAGES) as stream:
                async for piece in stream.text_stream:
                    received.append(piece)
    assert received == WORDS[:2]
    assert error_type(caught.value) == "overloaded_error"


@pytest.mark.asyncio
async def test_first_token_delay_is_observed(server: ProviderServer) -> None:
    delay = 0.3
    server.enqueue(Behavior(text=ANSWER, first_token_delay=delay))
    async with gpt(server) as client:
        t0 = time.monotonic()
        stream = await client.chat.completions.create(model=MODEL_O, messages=O_MESSAGES, stream=True)
        t_headers = time.monotonic()
        t_first: float | None = None
        async for chunk in stream:
            if t_first is None and chunk.choices and chunk.choices[0].delta.content:
                t_first = time.monotonic()
    assert t_first is not None
    assert t_first - t0 >= delay and t_first - t_headers > 0
    call = server.last_call
    # Headers (and the role chunk) go out at once, like the real API; the delay precedes the text.
    assert call.headers_sent_at is not None and call.first_token_at is not None
    assert call.first_token_at - call.headers_sent_at >= delay


async def _cancel_after(task: asyncio.Task[None], ready: asyncio.Event) -> float:
    await asyncio.wait_for(ready.wait(), timeout=5)
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return cancelled_at


def _assert_disconnect_seen(server: ProviderServer, call: CallRecord, cancelled_at: float) -> None:
    # No sleeps: wait_for wakes when the server records the disconnect.
    assert server.wait_for(lambda: call.disconnected_at is not None, timeout=1.0)
    assert call.disconnected_at is not None and call.disconnected_at - cancelled_at < 1.0
    assert server.wait_for(lambda: call.done, timeout=1.0)
    assert not call.completed and not call.dropped


@pytest.mark.asyncio
async def test_cancelled_consumer_mid_stream_is_seen_as_disconnect(server: ProviderServer) -> None:
    # The next token is 5 s away, so only prompt EOF detection (not a failed write) passes this.
    server.enqueue(Behavior(text=ANSWER, token_interval=5.0))
    got_token = asyncio.Event()

    async def consume(client: anthropic.AsyncAnthropic) -> None:
        async with client.messages.stream(model=MODEL_A, max_tokens=256, messages=A_MESSAGES) as stream:
            async for _ in stream.text_stream:
                got_token.set()

    async with claude(server) as client:
        cancelled_at = await _cancel_after(asyncio.create_task(consume(client)), got_token)
        call = server.last_call
        _assert_disconnect_seen(server, call, cancelled_at)
    assert call.tokens_sent == 1


@pytest.mark.asyncio
async def test_cancel_during_first_token_delay_is_seen_as_disconnect(server: ProviderServer) -> None:
    server.enqueue(Behavior(text=ANSWER, first_token_delay=30.0))
    opened = asyncio.Event()

    async def consume(client: openai.AsyncOpenAI) -> None:
        stream = await client.chat.completions.create(model=MODEL_O, messages=O_MESSAGES, stream=True)
        async with stream:
            opened.set()
            async for _ in stream:
                pass

    async with gpt(server) as client:
        cancelled_at = await _cancel_after(asyncio.create_task(consume(client)), opened)
        call = server.last_call
        _assert_disconnect_seen(server, call, cancelled_at)
    assert call.tokens_sent == 0 and call.headers_sent_at is not None


@pytest.mark.asyncio
async def test_hang_until_client_times_out(server: ProviderServer) -> None:
    server.enqueue(Behavior(hang=True))
    async with claude(server, timeout=0.3) as client:
        t0 = time.monotonic()
        with pytest.raises(anthropic.APITimeoutError):
            await client.messages.create(model=MODEL_A, max_tokens=64, messages=A_MESSAGES)
        timed_out_at = time.monotonic()
    call = server.calls[0]
    assert timed_out_at - t0 >= 0.3
    _assert_disconnect_seen(server, call, timed_out_at)
    assert call.headers_sent_at is None and call.status is None


# ----------------------------------------------------------------- scripting API
@pytest.mark.asyncio
async def test_queue_routing_defaults_and_reset(server: ProviderServer) -> None:
    server.enqueue(Behavior(status=500))  # generation only: embeddings must not consume it
    server.enqueue(Behavior(status=429), route="embeddings")
    server.default = Behavior(text="fallback [1]")
    async with gpt(server) as client:
        with pytest.raises(openai.RateLimitError):
            await client.embeddings.create(model="text-embedding-3-small", input="x")
        await client.embeddings.create(model="text-embedding-3-small", input="x")  # service_default: ok
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model=MODEL_O, messages=O_MESSAGES)
        completion = await client.chat.completions.create(model=MODEL_O, messages=O_MESSAGES)
    assert completion.choices[0].message.content == "fallback [1]"
    assert [c.status for c in server.calls] == [429, 200, 500, 200] and server.pending == 0

    server.enqueue(Behavior(status=500))
    server.reset()
    assert server.calls == [] and server.pending == 0 and server.default == Behavior()
    t0 = time.monotonic()
    assert not server.wait_for(lambda: len(server.calls) > 0, timeout=0.05)
    assert time.monotonic() - t0 >= 0.05
