"""Steps 1 and 1b of the request path: a `RagRequest` and the collections its key may read become a
`Question` (checked and redacted text, filters, permission set, history, cache key, scope and keyed
hash); a follow-up then becomes its standalone question, checked again like a question.

No I/O in step 1; step 1b may call the small model tier (service/answer/standalone.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from service.answer.schemas import RagRequest
from service.answer.shapes import Question
from service.answer.standalone import Rewriter
from service.errors import Forbidden, GuardrailViolation, InvalidRequest, UnknownModel
from service.observability.logs import note
from service.observability.tracing import span
from service.policy.collections import DEFAULT, CollectionForbiddenError, PermissionSet, permission_set
from service.policy.guardrails import Action, GuardrailPolicy, check_question
from service.policy.history import History, HistoryLimits, Turn, parse_history
from service.policy.pii import redact_pii
from service.policy.prompt import PROMPT_VERSION
from service.policy.routing import RoutingPolicy
from service.policy.tokens import count_tokens
from service.postgres.retrieval import Filters
from service.providers.base import Provider
from service.redis.answer_cache import KeyParts, cache_key, question_hash, scope_key
from service.redis.limits import TokenBudget
from service.redis.rewrites import RewriteCache
from service.settings import Settings


class QuestionReader:
    """Reads a request as a `Question`: `guard` (step 1, no I/O), then `understand` (step 1b)."""

    def __init__(
        self,
        *,
        guardrails: GuardrailPolicy,
        history_limits: HistoryLimits,
        rewriter: Rewriter,
        policy: RoutingPolicy,
        hash_key: bytes,
    ) -> None:
        self.guardrails = guardrails
        self.history_limits = history_limits
        self.rewriter = rewriter
        self.policy = policy  # the model names a request may ask for
        self.hash_key = hash_key  # keys the question hashes that reach logs, metrics and responses

    @classmethod
    def of(
        cls,
        settings: Settings,
        *,
        providers: Mapping[str, Provider],
        policy: RoutingPolicy,
        hash_key: bytes,
        rewrites: RewriteCache | None = None,
    ) -> QuestionReader:
        """The reader the settings describe: guardrail and history limits, the follow-up rewriter."""
        return cls(
            guardrails=GuardrailPolicy(
                max_chars=settings.question_max_chars,
                max_tokens=settings.question_max_tokens,
                injection=Action(settings.guard_injection),
                pii=settings.guard_pii,
            ),
            history_limits=HistoryLimits(settings.history_max_turns, settings.history_max_tokens),
            rewriter=Rewriter(
                mode=settings.rewrite,
                providers=providers,
                policy=policy,
                cache=rewrites,
                timeout_s=settings.rewrite_timeout_s,
                turns=settings.rewrite_turns,
            ),
            policy=policy,
            hash_key=hash_key,
        )

    # -- 1. guardrails (no I/O) ----------------------------------------------------------
    def guard(self, request: RagRequest, granted: Sequence[str] = (DEFAULT,)) -> Question:
        checked = check_question(request.question, self.guardrails, count_tokens)  # raises GuardrailViolation
        try:
            filters = Filters.parse(request.filters)
        except ValueError as exc:
            raise InvalidRequest("invalid_filters", str(exc)) from exc
        try:  # what this request may read: the cache unit (see service/policy/collections.py)
            permissions = permission_set(granted, filters.collections)
        except CollectionForbiddenError as exc:
            raise Forbidden("collection_forbidden", str(exc)) from exc
        if request.model not in ("auto", "small", "large") and request.model not in self.policy.allowed_models():
            allowed = ", ".join(["auto", "small", "large", *self.policy.allowed_models()])
            raise UnknownModel(f"model must be one of: {allowed}")
        history = self._history(request)  # raises HistoryViolation
        parts = _parts(checked.text, request, filters, history, permissions)
        return Question(
            request=request,
            text=checked.text,
            filters=filters,
            key=cache_key(parts),
            scope=scope_key(parts),
            hash=question_hash(checked.text, self.hash_key),
            flags=checked.flags,
            history=history,
            permissions=permissions,
        )

    def _history(self, request: RagRequest) -> History:
        """The request's earlier turns, checked and bounded, with personal data redacted like the question's."""
        if not request.history:
            return History()
        history = parse_history([(m.role, m.content) for m in request.history], self.history_limits, count_tokens)
        if self.guardrails.pii == "allow":
            return history
        return History(tuple(Turn(t.role, redact_pii(t.content)) for t in history.turns))

    # -- 1b. the standalone question of a follow-up ------------------------------------------
    async def understand(self, question: Question, budget: TokenBudget | None = None) -> Question:
        """A follow-up as the standalone question the cache, retrieval and prompt use (service/answer/standalone.py)."""
        if not question.history.user_turns:
            return question
        with span("rag.understand") as traced:
            standalone = await self.rewriter.standalone(question.text, question.history, budget)
            traced.set(rewrite=standalone.how)
        note(history_turns=len(question.history.turns), rewrite=standalone.how)  # the access line: how, never what
        if standalone.text == question.text:
            return question
        # Built from earlier turns (or a model's reply): untrusted text, checked like a question.
        try:
            checked = check_question(standalone.text, self.guardrails, count_tokens)
        except GuardrailViolation:
            if standalone.how not in ("model", "cached"):
                raise
            # The model's reply, not the client, broke a rule: the offline rules answer instead.
            checked = check_question(standalone.offline, self.guardrails, count_tokens)
        parts = _parts(checked.text, question.request, question.filters, question.history, question.permissions)
        return replace(
            question,
            text=checked.text,
            asked=question.text,
            key=cache_key(parts),
            scope=scope_key(parts),
            hash=question_hash(checked.text, self.hash_key),
            flags=tuple(dict.fromkeys((*question.flags, *checked.flags))),
        )


def _parts(text: str, request: RagRequest, filters: Filters, history: History, permissions: PermissionSet) -> KeyParts:
    """What the cache key (and, without the text, the scope) is made of."""
    return KeyParts(
        text,
        request.top_k,
        filters,
        request.model,
        request.max_tokens,
        request.temperature,
        PROMPT_VERSION,
        permissions.token,
        instructions="\n\n".join(history.instructions),
    )
