"""The one interface every generator implements, and the errors the fallback logic reads."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.postgres.retrieval import Source


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    system: str
    prompt: str  # the user turn: numbered sources, then the question
    max_tokens: int
    temperature: float
    question: str  # the (redacted) question alone, for generators that do not read prompts
    sources: Sequence[Source] = ()


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    estimated: bool = False  # True when counted with tiktoken rather than reported by the provider


class ProviderError(Exception):
    """A failed generation. `retryable` errors may be retried or fall back before the first token."""

    def __init__(self, provider: str, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.message = message
        self.retryable = retryable
        self.status = status


class Provider(Protocol):
    name: str

    def stream(self, request: GenerationRequest) -> AsyncGenerator[str | Usage, None]:
        """Text deltas as they arrive, then exactly one `Usage`. Raises `ProviderError`."""
        ...


async def collect(provider: Provider, request: GenerationRequest, pieces: list[str], spent: list[Usage]) -> None:
    """A short answer whole: its text into `pieces`, its usage into `spent` (what arrived before a
    failure stays there). For the small tier's side calls (a follow-up's rewrite, a verification)."""
    stream = provider.stream(request)
    try:
        async for item in stream:
            if isinstance(item, str):
                pieces.append(item)
            else:
                spent.append(item)
    finally:
        await stream.aclose()


def is_retryable_status(status: int) -> bool:
    """Rate limits, overload (Anthropic's 529), timeouts and server errors may pass; 4xx will not."""
    return status in (408, 409, 429) or status >= 500


def provider_error(provider: str, exc: Exception) -> ProviderError:
    """One mapping for every SDK: an HTTP status says whether to retry; a transport error may pass."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return ProviderError(provider, f"HTTP {status}", retryable=is_retryable_status(status), status=status)
    return ProviderError(provider, type(exc).__name__, retryable=True)
