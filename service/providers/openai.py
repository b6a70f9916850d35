"""OpenAI Chat Completions, streaming with usage, through the official SDK.

Also serves any OpenAI-compatible server (vLLM, Ollama, llama.cpp) via OPENAI_BASE_URL.
Such servers may not report usage; then it is estimated with tiktoken.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import openai

from service.policy.tokens import count_tokens
from service.providers.base import GenerationRequest, Usage, provider_error


class OpenAIProvider:
    name = "openai"

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None = None,
        max_retries: int = 2,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "not-needed",  # local OpenAI-compatible servers often take no key
            base_url=base_url,
            max_retries=max_retries,
            timeout=openai.Timeout(read_timeout, connect=connect_timeout),
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[str | Usage, None]:
        usage: Usage | None = None
        pieces: list[str] = []
        try:
            stream = await self._client.chat.completions.create(
                model=request.model,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                messages=[
                    {"role": "system", "content": request.system},
                    {"role": "user", "content": request.prompt},
                ],
                stream=True,
                stream_options={"include_usage": True},
            )
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            pieces.append(choice.delta.content)
                            yield choice.delta.content
        except Exception as exc:  # SDK errors, and transport errors it does not wrap
            raise provider_error(self.name, exc) from exc
        if usage is None:
            usage = Usage(count_tokens(request.system + request.prompt), count_tokens("".join(pieces)), estimated=True)
        yield usage

    async def aclose(self) -> None:
        await self._client.close()
