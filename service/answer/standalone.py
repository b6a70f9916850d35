"""The standalone question of a follow-up: by the small model tier when one is configured, else by rules.

A question that refers back ("how do I revoke it?") is rewritten before the cache and retrieval,
so both work on what it means. `RAG_REWRITE`:

- `auto`: with a provider configured, one short call to the first small-tier model, under its own
  timeout (`RAG_REWRITE_TIMEOUT_S`), reading the last `RAG_REWRITE_TURNS` user turns; its result
  is cached in Redis (service/redis/rewrites.py), so a replayed conversation makes no call. A
  failure, a timeout or an unusable reply falls back to the offline rules. Without a provider,
  the offline rules (service/policy/followups.py).
- `offline`: the rules only. `off`: no rewrite.

A question the rules see no reference in (no pronoun, no ellipsis) is never rewritten: it costs
nothing, with or without a model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from service.answer.budgeting import charged_call
from service.errors import BudgetExceeded, Overloaded
from service.observability.tracing import span
from service.policy.followups import needs_rewrite, rewrite
from service.policy.history import History
from service.policy.prompt import neutralize
from service.policy.routing import RoutingPolicy
from service.providers.base import GenerationRequest, Provider
from service.redis.limits import TokenBudget
from service.redis.rewrites import RewriteCache, rewrite_key

log = logging.getLogger(__name__)

RewriteMode = Literal["auto", "offline", "off"]
How = Literal["none", "offline", "model", "cached", "fallback"]

REWRITE_SYSTEM: Final = (
    "You rewrite the user's last question into a standalone question that can be understood without "
    "the conversation: replace pronouns and elliptical phrases with what they refer to in the earlier "
    "user questions. Keep the user's wording otherwise; do not answer it. "
    "Reply with the standalone question alone, on one line."
)
REWRITE_MAX_TOKENS: Final = 80
_MAX_CHARS: Final = 1000


@dataclass(frozen=True)
class Standalone:
    text: str
    how: How  # none: no rewrite needed; offline/model/cached; fallback: the model failed, rules used
    offline: str = ""  # the rules' rewrite, computed on the way: what answers if a model's reply is refused


def rewrite_prompt(user_turns: tuple[str, ...], question: str) -> str:
    """The user message of the rewrite call; the turns are untrusted text, escaped like sources."""
    lines = "\n".join(f"User: {neutralize(turn)}" for turn in user_turns)
    return (
        f"Earlier user questions:\n<conversation>\n{lines}\n</conversation>\n\n"
        f"Last question: {neutralize(question)}\n\nStandalone question:"
    )


def _usable(reply: str) -> str | None:
    text = " ".join(reply.split()).strip().strip('"“”').strip()
    if text.lower().startswith("standalone question:"):
        text = text.split(":", 1)[1].strip()
    return text if 0 < len(text) <= _MAX_CHARS else None


class Rewriter:
    def __init__(
        self,
        *,
        mode: RewriteMode,
        providers: Mapping[str, Provider],
        policy: RoutingPolicy,
        cache: RewriteCache | None,
        timeout_s: float,
        turns: int,
    ) -> None:
        self.mode = mode
        self.cache = cache
        self.timeout_s = timeout_s
        self.turns = turns
        # The first small-tier model that is a real language model; none: the rules alone.
        models = [c for c in policy.small if c.provider != "extractive" and c.provider in providers]
        self.choice = models[0] if models and mode == "auto" else None
        self.provider = providers[self.choice.provider] if self.choice else None

    async def standalone(self, question: str, history: History, budget: TokenBudget | None = None) -> Standalone:
        """The standalone question; a model rewrite is reserved from and charged to `budget` like an
        answer, and a key whose tokens are spent gets the offline rules (which cost nothing)."""
        recent = history.user_turns[-self.turns :]
        if self.mode == "off" or not recent or not needs_rewrite(question):
            return Standalone(question, "none")
        offline = rewrite(question, recent)
        if self.choice is None or self.provider is None:
            return Standalone(offline, "offline", offline)
        key = rewrite_key(recent, question, f"{self.choice.provider}/{self.choice.model}")
        if self.cache is not None and (cached := await self.cache.get(key)) is not None:
            return Standalone(cached, "cached", offline)
        prompt = rewrite_prompt(recent, question)
        request = GenerationRequest(self.choice.model, REWRITE_SYSTEM, prompt, REWRITE_MAX_TOKENS, 0.0, question)
        try:
            with span("rag.rewrite", provider=self.choice.provider, model=self.choice.model) as traced:
                text = await charged_call(
                    budget, self.provider, request, self.timeout_s, "rewrite (the offline rules answer)"
                )
                reply = _usable(text) if text is not None else None
                traced.set(outcome="ok" if reply else "fallback")
        except (BudgetExceeded, Overloaded):  # spent, or the limits pool busy: the rules cost nothing
            return Standalone(offline, "offline", offline)
        if reply is None:
            return Standalone(offline, "fallback", offline)
        if self.cache is not None:
            await self.cache.put(key, reply)
        return Standalone(reply, "model", offline)
