"""The caller's token budget around a generation, from outside it: a miss checks the budget; the
request that will generate (a coalescing leader, not its followers) holds one of its key's
in-flight slots while it does (`in_flight`); a generation reserves its tokens before a model is
called and settles them as its events end (`settling`); a short side call to the small tier (a
follow-up's rewrite, a semantic verification) is reserved and charged the same way (`charged_call`).
Without a budget (`None`) each of these does nothing.

The counters themselves live in Redis (service/redis/limits.py: `TokenBudget`, `Reservation`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from service.answer.events import Done, Event, Token
from service.policy.tokens import count_tokens
from service.providers.base import GenerationRequest, Provider, ProviderError, Usage, collect
from service.redis.limits import Reservation, TokenBudget

log = logging.getLogger(__name__)


def tenant(budget: TokenBudget | None) -> str:
    """Whose turn it is in the admission queue (service/answer/admission.py): the key's id."""
    return budget.principal.key_id if budget is not None else ""


async def checked(budget: TokenBudget | None) -> None:
    """Raises `BudgetExceeded` when the caller's tokens for today are spent (a generation would cost)."""
    if budget is not None:
        await budget.check()


async def in_flight(
    budget: TokenBudget | None, produce: Callable[[bool], AsyncIterator[Event]], look_again: bool
) -> AsyncIterator[Event]:
    """`produce(look_again)`'s events, holding one of the key's in-flight slots while they last.

    The slot is taken first (`RateLimited` `too_many_inflight` when all are taken) and vacated as
    the events end, however they end (done, error, a cancelled producer), so only a request that
    generates holds one: a coalescing leader (or a follower that took over), never a follower.
    A slot left by a crashed worker lapses on its own (`RAG_TOTAL_TIMEOUT_S` + 30 s: service/http/app.py).
    """
    try:
        if budget is not None:
            await budget.occupy()  # inside: cancelled while taking it, the slot is still vacated
        async for event in produce(look_again):
            yield event
    finally:
        if budget is not None and budget.occupied:
            await asyncio.shield(budget.vacate())


async def reserved(budget: TokenBudget | None, tokens: int) -> Reservation | None:
    """Today's tokens for this generation, reserved at once (`BudgetExceeded` if they are not all left)."""
    return await budget.reserve(tokens) if budget is not None else None


async def charged_call(
    budget: TokenBudget | None, provider: Provider, request: GenerationRequest, timeout_s: float, purpose: str
) -> str | None:
    """A short side call's whole text, or None when it failed or timed out (logged as `purpose`).

    Its prompt plus `max_tokens` are reserved first (`BudgetExceeded`, or `Overloaded` when the
    limits pool is busy: the caller falls back, the step is optional). It is charged as it ends: the
    usage the provider reported; else, when the provider had the prompt (a timeout, a cancellation,
    a dropped connection), the prompt and what streamed; a refusal with a status and no text, nothing.
    """
    prompt_tokens = count_tokens(request.system + request.prompt)
    reservation = await reserved(budget, prompt_tokens + request.max_tokens)
    pieces: list[str] = []
    spent: list[Usage] = []
    billed = True
    try:
        await asyncio.wait_for(collect(provider, request, pieces, spent), timeout_s)
    except (ProviderError, TimeoutError) as exc:
        billed = not isinstance(exc, ProviderError) or exc.status is None or bool(pieces)
        log.warning("%s failed: %s", purpose, type(exc).__name__)
        return None
    finally:
        if reservation is not None:  # what the call cost, never more than was reserved
            if spent:
                used = sum(u.input_tokens + u.output_tokens for u in spent)
            else:
                used = prompt_tokens + count_tokens("".join(pieces)) if billed else 0
            await asyncio.shield(reservation.settle(used))
    return "".join(pieces)


async def settling(
    events: AsyncIterator[Event], reservation: Reservation | None, prompt_tokens: int
) -> AsyncIterator[Event]:
    """`events`, settling `reservation` on the way: to the usage `done` reports (before passing it
    on, so a client that sees `done` sees the charge); or, when the answer ends early (an error
    event, a disconnect, a cancellation), to the prompt plus the tokens streamed (nothing if none was)."""
    if reservation is None:
        async for event in events:
            yield event
        return
    streamed: list[str] = []
    try:
        async for event in events:
            if isinstance(event, Token):
                streamed.append(event.text)
            elif isinstance(event, Done):
                await asyncio.shield(reservation.settle(event.usage.input_tokens + event.usage.output_tokens))
            yield event
    finally:
        if not reservation.settled:
            used = prompt_tokens + count_tokens("".join(streamed)) if streamed else 0
            await asyncio.shield(reservation.settle(used))
