"""Anthropic Messages API, streaming, over httpx: the one endpoint the service calls, without the SDK.

`import anthropic` loads every type of the whole API (3,300 modules, beta included: its error types
import the beta ones) and holds ~43 MB in every API worker that has Anthropic configured, for one
request shape. This client speaks that request's wire format (`POST /v1/messages` with
`"stream": true`, server-sent events) and keeps what the service relied on the SDK for:

- retries before any byte of the answer exists, as the SDK does them: connection failures and
  timeouts, and statuses 408, 409, 429 and 5xx (Anthropic's 529 too) unless `x-should-retry` says
  otherwise; the wait is what `retry-after-ms` / `retry-after` ask, else 0.5 s doubling up to 8 s,
  minus up to 25 % jitter; at most `max_retries` of them;
- the same timeouts (connect; read, write and pool) and the SDK's connection limits;
- the same errors, through `provider_error`: an HTTP status says whether to fall back; an error
  event inside the stream carries the stream's own status (200, not retryable), as the SDK's
  `APIStatusError` did; a transport failure is retryable and named as the SDK named it.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx

from service.providers.base import GenerationRequest, ProviderError, Usage, is_retryable_status, provider_error

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=100)  # the SDK's defaults
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0


def should_retry(status: int, headers: Mapping[str, str]) -> bool:
    """The SDK's rule: the server's `x-should-retry` if given, else 408, 409, 429 and 5xx."""
    said = headers.get("x-should-retry")
    if said in ("true", "false"):
        return said == "true"
    return status in (408, 409, 429) or status >= 500


def retry_delay(attempt: int, headers: Mapping[str, str] | None = None) -> float:
    """Seconds before retry number `attempt` (0 first): what the server asks, else backoff with jitter."""
    asked = _retry_after(headers) if headers is not None else None
    if asked is not None and asked > 0:
        return min(asked, 4_294_967.0)
    backoff = min(INITIAL_RETRY_DELAY_S * 2.0 ** min(attempt, 1000), MAX_RETRY_DELAY_S)
    return max(0.0, backoff * (1 - 0.25 * random.random()))


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        return float(headers.get("retry-after-ms", "")) / 1000
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    date = email.utils.parsedate_tz(value)
    return None if date is None else float(email.utils.mktime_tz(date) - time.time())


async def _events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """(event name, decoded data) of a server-sent event stream."""
    name, data = "", []
    async for line in response.aiter_lines():
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        elif data:
            yield name, json.loads("\n".join(data))
            name, data = "", []


class AnthropicProvider:
    name = "anthropic"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        max_retries: int = 2,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.max_retries = max_retries
        self._client = httpx.AsyncClient(
            base_url=(base_url or DEFAULT_BASE_URL).rstrip("/"),
            headers={"x-api-key": api_key, "anthropic-version": API_VERSION, "accept": "application/json"},
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=LIMITS,
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[str | Usage, None]:
        body = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            # No temperature: current models refuse it (the SDK generation in use dropped it too).
            "system": request.system,
            "messages": [{"role": "user", "content": request.prompt}],
            "stream": True,
        }
        usage: dict[str, int] = {}
        finished = False
        try:
            async with self._response(body) as response:
                async for event, data in _events(response):
                    if event == "content_block_delta":
                        delta = data.get("delta") or {}
                        if delta.get("type") == "text_delta" and delta.get("text"):
                            yield delta["text"]
                    elif event in ("message_start", "message_delta"):
                        given = (data.get("message") or {}).get("usage") if event == "message_start" else None
                        for key, value in (given or data.get("usage") or {}).items():
                            if key in ("input_tokens", "output_tokens") and isinstance(value, int):
                                usage[key] = value
                    elif event == "message_stop":
                        finished = True
                    elif event == "error":  # as the SDK: an error with the stream's status
                        status = response.status_code
                        raise ProviderError(
                            self.name, f"HTTP {status}", retryable=is_retryable_status(status), status=status
                        )
        except ProviderError:
            raise
        except Exception as exc:  # transport errors, a malformed stream
            raise provider_error(self.name, exc) from exc
        if not finished:
            raise ProviderError(self.name, "the stream ended before message_stop", retryable=True)
        yield Usage(usage.get("input_tokens", 0), usage.get("output_tokens", 0))

    @asynccontextmanager
    async def _response(self, body: dict[str, Any]) -> AsyncIterator[httpx.Response]:
        """The streaming response of the first attempt that the server accepts (retries as documented above)."""
        attempt = 0
        while True:
            retries_left = self.max_retries - attempt
            try:
                response = await self._client.send(
                    self._client.build_request("POST", "/v1/messages", json=body), stream=True
                )
            except httpx.TransportError as exc:
                if retries_left <= 0:
                    failure = "APITimeoutError" if isinstance(exc, httpx.TimeoutException) else "APIConnectionError"
                    raise ProviderError(self.name, failure, retryable=True) from exc
                await asyncio.sleep(retry_delay(attempt))
                attempt += 1
                continue
            if response.status_code >= 400:
                status = response.status_code
                await response.aclose()
                if retries_left > 0 and should_retry(status, response.headers):
                    await asyncio.sleep(retry_delay(attempt, response.headers))
                    attempt += 1
                    continue
                raise ProviderError(self.name, f"HTTP {status}", retryable=is_retryable_status(status), status=status)
            try:
                yield response
            finally:
                await response.aclose()
            return

    async def aclose(self) -> None:
        await self._client.aclose()
