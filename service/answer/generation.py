"""Streaming generation with fallback.

Status-code retries (429, 529, 5xx, connection errors) happen inside the provider SDKs,
before any token exists. Here the route's candidates are tried in order: a candidate that
fails or stays silent past the first-token timeout is abandoned for the next one, until a
first token arrives. From then on the client has seen text, so a failure is final and is
reported as an `error` event by the caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from service.observability.tracing import detached_span
from service.policy.routing import ModelChoice
from service.providers.base import GenerationRequest, Provider, ProviderError, Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answering:
    """Emitted once, just before the first token: the candidate that is answering."""

    choice: ModelChoice
    failed: tuple[str, ...] = ()  # "provider/model: reason" of the candidates abandoned before it


@dataclass
class AllProvidersFailedError(Exception):
    failures: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "every model failed: " + "; ".join(self.failures)


@dataclass(frozen=True)
class Timeouts:
    first_token_s: float = 20.0
    total_s: float = 120.0


OnAttempt = Callable[[ModelChoice, str, int | None], None]


@dataclass(frozen=True)
class Models:
    """What step 6 calls: the providers by name, the timeouts, and who is told how each attempt went."""

    providers: Mapping[str, Provider]
    timeouts: Timeouts
    on_attempt: OnAttempt | None = None

    def generate(
        self, candidates: Sequence[ModelChoice], make_request: Callable[[str], GenerationRequest]
    ) -> AsyncIterator[Answering | str | Usage]:
        return generate(candidates, self.providers, make_request, self.timeouts, self.on_attempt)


async def generate(
    candidates: Sequence[ModelChoice],
    providers: Mapping[str, Provider],
    make_request: Callable[[str], GenerationRequest],
    timeouts: Timeouts,
    on_attempt: OnAttempt | None = None,
) -> AsyncIterator[Answering | str | Usage]:
    """Yields `Answering`, then the text deltas, then one `Usage`.

    `on_attempt(choice, outcome, status)` is told how each candidate went before its first
    token: "ok", "error" or "timeout" (for metrics).
    """
    deadline = time.monotonic() + timeouts.total_s
    failures: list[str] = []
    attempt = 0
    for choice in candidates:
        provider = providers.get(choice.provider)
        if provider is None:
            continue
        attempt += 1
        # One span per model tried, from the call to the stream's end; not current, as it spans yields.
        with detached_span("rag.provider", provider=choice.provider, model=choice.model, attempt=attempt) as call:
            stream = provider.stream(make_request(choice.model))
            try:
                budget = min(timeouts.first_token_s, deadline - time.monotonic())
                try:
                    first = await asyncio.wait_for(anext(stream), max(budget, 0.001))
                except (ProviderError, TimeoutError, StopAsyncIteration) as exc:
                    reason = _describe(exc)
                    outcome = "timeout" if isinstance(exc, TimeoutError) else "error"
                    status = exc.status if isinstance(exc, ProviderError) else None
                    if on_attempt is not None:
                        on_attempt(choice, outcome, status)
                    call.set(outcome=outcome, http_status=status)
                    call.error(reason)
                    failures.append(f"{choice.provider}/{choice.model}: {reason}")
                    log.warning(
                        "provider failed before first token, falling back: %s/%s %s", *choice_parts(choice), reason
                    )
                    continue
                call.event("first_token")
                call.set(outcome="ok")
                if on_attempt is not None:
                    on_attempt(choice, "ok", None)
                yield Answering(choice, tuple(failures))
                yield first
                # A deadline check rather than asyncio.timeout: that binds to the task that entered it,
                # and a generation may be finished by another task when the leader's client leaves.
                # Stalls between tokens are caught by the SDK's read timeout.
                async for item in stream:
                    if time.monotonic() > deadline:
                        raise TimeoutError("total generation time exceeded")
                    if isinstance(item, Usage):
                        call.set(input_tokens=item.input_tokens, output_tokens=item.output_tokens)
                    yield item
                return
            finally:
                await stream.aclose()
    raise AllProvidersFailedError(failures)


def choice_parts(choice: ModelChoice) -> tuple[str, str]:
    return choice.provider, choice.model


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ProviderError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return "no first token in time"
    return "empty response"
