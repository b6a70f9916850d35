"""The Anthropic provider (the Messages API over httpx, no SDK) against the loopback ProviderServer:
text deltas then usage, the SDK's retries and their waits, and the same errors the SDK gave."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.providers.anthropic import AnthropicProvider, retry_delay, should_retry
from service.providers.base import GenerationRequest, ProviderError, Usage
from tests.support.provider_server import Behavior, ProviderServer

REQUEST = GenerationRequest(
    model="claude-haiku-4-5", system="Be brief.", prompt="one two three", max_tokens=64, temperature=0.0, question="q"
)


@pytest.fixture(scope="module")
def server() -> Iterator[ProviderServer]:
    with ProviderServer() as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(server: ProviderServer) -> None:
    server.reset()


async def collect(server: ProviderServer, max_retries: int = 0) -> list[str | Usage]:
    provider = AnthropicProvider(api_key="sk-ant-test", base_url=server.base_url, max_retries=max_retries)
    try:
        return [item async for item in provider.stream(REQUEST)]
    finally:
        await provider.aclose()


async def test_text_deltas_in_order_then_the_reported_usage(server: ProviderServer) -> None:
    server.enqueue(Behavior(chunks=["Paris", " is", " the capital."], input_tokens=17, output_tokens=4))
    assert await collect(server) == ["Paris", " is", " the capital.", Usage(17, 4)]
    (call,) = server.calls_to("messages")
    assert call.status == 200


async def test_an_overloaded_answer_is_retried_after_the_wait_the_server_asks(server: ProviderServer) -> None:
    server.enqueue(Behavior(status=529, retry_after=0.01), Behavior(chunks=["ok"]))
    assert (await collect(server, max_retries=1))[0] == "ok"
    assert [c.status for c in server.calls_to("messages")] == [529, 200]


async def test_retries_run_out_into_a_retryable_error_with_the_status(server: ProviderServer) -> None:
    server.enqueue(Behavior(status=529, retry_after=0.01), Behavior(status=529, retry_after=0.01))
    with pytest.raises(ProviderError) as failed:
        await collect(server, max_retries=1)
    assert failed.value.status == 529 and failed.value.retryable and failed.value.message == "HTTP 529"
    assert len(server.calls_to("messages")) == 2


async def test_a_client_error_is_not_retried_and_not_retryable(server: ProviderServer) -> None:
    server.enqueue(Behavior(status=400))
    with pytest.raises(ProviderError) as failed:
        await collect(server, max_retries=2)
    assert failed.value.status == 400 and not failed.value.retryable
    assert len(server.calls_to("messages")) == 1


async def test_x_should_retry_false_overrides_a_retryable_status(server: ProviderServer) -> None:
    server.enqueue(Behavior(status=503, should_retry=False))
    with pytest.raises(ProviderError) as failed:
        await collect(server, max_retries=2)
    assert failed.value.status == 503 and len(server.calls_to("messages")) == 1


async def test_an_error_event_inside_the_stream_fails_with_the_streams_status(server: ProviderServer) -> None:
    server.enqueue(Behavior(chunks=["a", "b", "c"], error_after=2))
    provider = AnthropicProvider(api_key="sk-ant-test", base_url=server.base_url, max_retries=0)
    got: list[str | Usage] = []
    with pytest.raises(ProviderError) as failed:
        async for item in provider.stream(REQUEST):
            got.append(item)
    await provider.aclose()
    assert got == ["a", "b"] and failed.value.status == 200 and not failed.value.retryable


async def test_a_dropped_connection_mid_answer_is_a_retryable_transport_error(server: ProviderServer) -> None:
    server.enqueue(Behavior(chunks=["a", "b", "c"], drop_after=1))
    with pytest.raises(ProviderError) as failed:
        await collect(server)
    assert failed.value.retryable and failed.value.status is None


async def test_an_unreachable_server_is_a_connection_error_after_the_retries() -> None:
    provider = AnthropicProvider(api_key="k", base_url="http://127.0.0.1:9", max_retries=0, connect_timeout=2)
    with pytest.raises(ProviderError) as failed:
        [item async for item in provider.stream(REQUEST)]
    await provider.aclose()
    assert failed.value.message == "APIConnectionError" and failed.value.retryable


def test_retry_rules_are_the_sdks() -> None:
    assert should_retry(529, {}) and should_retry(429, {}) and should_retry(408, {}) and should_retry(409, {})
    assert not should_retry(400, {}) and not should_retry(503, {"x-should-retry": "false"})
    assert should_retry(400, {"x-should-retry": "true"})
    assert retry_delay(0, {"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_delay(3, {"retry-after": "2"}) == 2.0
    assert 0.375 <= retry_delay(0) <= 0.5 and 6.0 <= retry_delay(10, {}) <= 8.0
