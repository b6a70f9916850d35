"""Step 3's optional second opinion: before a cached answer serves another wording, the small model
tier is asked whether the two questions ask for the same information (`RAG_SEMANTIC_VERIFY=small`).

With verification on, the judge's candidates down to `RAG_SEMANTIC_VERIFY_FLOOR` (below the judge's
threshold) are looked at, and every candidate -- those above the threshold too: precision comes
first -- is served only on a "yes" (service/policy/semantic_verify.py reads the reply strictly;
anything but "yes" is a no). A verdict is remembered in Redis for as long as the cached entry lives
(service/redis/verdicts.py), so a repeat makes no call. One call per lookup at most, under its own
timeout (`RAG_SEMANTIC_VERIFY_TIMEOUT_S`), reserved from and charged to the key's token budget like
an answer; a failure, a timeout or a spent budget means no semantic hit (the miss path answers).
The call runs where the semantic lookup runs, inside the miss's admission slot, so a slow verifier
holds that slot for up to its timeout.

Without a language model configured (the offline extractive default) verification is off whatever
the setting says, and the worker says so once when it starts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Literal

from service.answer.budgeting import charged_call
from service.errors import BudgetExceeded, Overloaded
from service.observability.logs import note
from service.observability.tracing import span
from service.policy.guardrails import normalize_for_key
from service.policy.routing import RoutingPolicy
from service.policy.semantic_verify import VERIFY_MAX_TOKENS, VERIFY_SYSTEM, verdict, verify_prompt
from service.postgres.semantic_index import SemanticMatch
from service.providers.base import GenerationRequest, Provider
from service.redis.limits import TokenBudget
from service.redis.verdicts import VerdictCache

log = logging.getLogger(__name__)

VerifyMode = Literal["off", "small"]
Unjudged = Literal["refused", "failed"]  # why a candidate got no verdict (the access log's `semantic_verify`)


class Verifier:
    """The small tier's verdicts on semantic candidates; `check(question, budget)` judges one lookup's."""

    def __init__(
        self,
        *,
        mode: VerifyMode = "off",
        providers: Mapping[str, Provider] | None = None,
        policy: RoutingPolicy | None = None,
        verdicts: VerdictCache | None = None,
        floor: float = 0.5,
        timeout_s: float = 3.0,
    ) -> None:
        providers = providers or {}
        models = [c for c in policy.small if c.provider in providers and c.provider != "extractive"] if policy else []
        self.choice = models[0] if models and mode == "small" else None
        self.provider = providers[self.choice.provider] if self.choice else None
        self.verdicts = verdicts
        self.floor = floor if self.choice else None  # how far below the threshold candidates are looked at
        self.timeout_s = timeout_s
        if mode == "small" and self.choice is None:
            log.warning("semantic verification off: no language model is configured (RAG_SEMANTIC_VERIFY=small)")

    def check(self, question: str, budget: TokenBudget | None) -> Check:
        return Check(self, question, budget)

    async def ask(self, question: str, cached: str, budget: TokenBudget | None) -> bool | Unjudged:
        """The model's verdict (True: the same information), or why it could not be had: "refused" (the
        key's budget is spent, or its limits pool too busy to reserve: the step is optional, never a
        503) or "failed" (the call failed or timed out)."""
        assert self.choice is not None and self.provider is not None
        prompt = verify_prompt(question, cached)
        request = GenerationRequest(self.choice.model, VERIFY_SYSTEM, prompt, VERIFY_MAX_TOKENS, 0.0, question)
        try:
            with span("rag.semantic_verify", provider=self.choice.provider, model=self.choice.model):
                reply = await charged_call(budget, self.provider, request, self.timeout_s, "semantic verification")
        except (BudgetExceeded, Overloaded):
            return "refused"
        return "failed" if reply is None else verdict(reply)


class Check:
    """One lookup's candidates, one at a time: `await check(match)` is the match to serve, or None."""

    def __init__(self, verifier: Verifier, question: str, budget: TokenBudget | None) -> None:
        self.verifier = verifier
        self.question = question
        self.budget = budget
        self.calls_left = 1

    async def __call__(self, match: SemanticMatch) -> SemanticMatch | None:
        v = self.verifier
        if v.choice is None or normalize_for_key(match.question) == normalize_for_key(self.question):
            return match  # verification off, or the same words: the judge's decision stands
        model = f"{v.choice.provider}/{v.choice.model}"
        same = await v.verdicts.get(match.key, self.question, model) if v.verdicts else None
        how = "remembered"
        if same is None:
            if self.calls_left <= 0:
                return None
            self.calls_left -= 1
            judged, how = await v.ask(self.question, match.question, self.budget), "model"
            if not isinstance(judged, bool):  # no verdict: no hit, and no more calls for this lookup
                self.calls_left = 0
                note(semantic_verify=judged)
                return None
            same = judged
            if v.verdicts is not None:
                await v.verdicts.put(match.key, self.question, model, same)
        note(semantic_verify=f"{how}:{'yes' if same else 'no'}")
        return replace(match, verified=True) if same else None
