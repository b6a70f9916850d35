"""Anthropic Messages API, streaming, through the official SDK.

The SDK retries 429, 529, 5xx and connection failures itself (exponential backoff with
jitter, honouring Retry-After) before any byte of the answer exists; that is exactly the
window in which a retry is invisible to our client.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import anthropic

from service.providers.base import GenerationRequest, Usage, provider_error


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
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            max_retries=max_retries,
            timeout=anthropic.Timeout(read_timeout, connect=connect_timeout),
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[str | Usage, None]:
        try:
            async with self._client.messages.stream(
                model=request.model,
                max_tokens=request.max_tokens,
                # No temperature: this SDK generation dropped the parameter for current models.
                system=request.system,
                messages=[{"role": "user", "content": request.prompt}],
            ) as stream:
                async for text in stream.text_stream:
                    if text:
                        yield text
                final = await stream.get_final_message()
        except Exception as exc:  # SDK errors, and transport errors it lets escape unwrapped (httpx2)
            raise provider_error(self.name, exc) from exc
        yield Usage(final.usage.input_tokens, final.usage.output_tokens)

    async def aclose(self) -> None:
        await self._client.close()
