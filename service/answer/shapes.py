"""What the pipeline's steps hand each other, and how one shape becomes the next (no I/O).

A `Question` and its sources become a prompt and a route (step 5), then a provider request; a
provider's route and usage become the `meta` and `done` fields; a cached answer becomes the
events of a hit, and a generated one becomes a cache entry.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from service.answer.events import Clock, Done, Event, Meta, Token
from service.answer.generation import Answering
from service.answer.schemas import CacheOutcome, RagRequest, RouteInfo, SourceInfo, UsageInfo
from service.embeddings.encoders import Vectors
from service.errors import UnknownModel
from service.policy.collections import DEFAULT, PermissionSet
from service.policy.history import History
from service.policy.prompt import Prompt, build_prompt
from service.policy.routing import Route, RoutingPolicy, UnknownModelError, choose_route
from service.postgres.retrieval import Filters, Source
from service.postgres.semantic_index import SemanticMatch
from service.providers.base import GenerationRequest, Usage
from service.redis.answer_cache import CachedAnswer
from service.settings import Settings

Vector = Vectors  # one row of the embedder's output


@dataclass
class Question:
    """A request that passed the guardrails: redacted text and everything the key needs."""

    request: RagRequest
    text: str
    filters: Filters
    key: str
    scope: str  # the key without the question: what a semantic match must share
    hash: str
    flags: tuple[str, ...] = ()
    vector: Vector | None = None  # embedded once, used by the semantic cache and retrieval
    permissions: PermissionSet = field(default_factory=lambda: PermissionSet((DEFAULT,)))  # part of `key`, `scope`
    history: History = field(default_factory=History)  # the turns before it (validated, redacted like the question)
    asked: str = ""  # the question as asked (redacted), when `text` is its standalone rewrite

    @property
    def standalone_question(self) -> str | None:
        """The rewrite, for the `meta` event: only when it differs from the question asked."""
        return self.text if self.asked and self.asked != self.text else None


def planned(
    question: Question, sources: list[Source], policy: RoutingPolicy, settings: Settings
) -> tuple[Route, Prompt]:
    """Step 5: the prompt (sources, and for a private answer recent turns, within the settings' token budgets), then the
    route its size and the question choose (`UnknownModel` for a model the policy does not list)."""
    # A shared answer (cache "use" or "refresh") is the standalone question's answer for everyone with
    # this permission set, so it must not depend on a transcript the client wrote: a made-up history
    # could steer it. Only a private answer ("bypass": neither read nor written) sees the turns.
    private = question.request.cache == "bypass"
    prompt = build_prompt(
        question.text,
        sources,
        context_budget=settings.context_token_budget,
        conversation=question.history.dialogue if private else (),
        conversation_budget=settings.history_prompt_tokens,
        instructions=question.history.instructions,
    )
    try:
        route = choose_route(
            question.request.model,
            question=question.text,
            prompt_tokens=prompt.prompt_tokens,
            max_tokens=question.request.max_tokens,
            policy=policy,
        )
    except UnknownModelError as exc:
        raise UnknownModel(str(exc)) from exc
    return route, prompt


def cost_usd(model: str, usage: Usage, pricing: Mapping[str, tuple[float, float]]) -> float:
    per_in, per_out = pricing.get(model, (0.0, 0.0))
    return round((usage.input_tokens * per_in + usage.output_tokens * per_out) / 1_000_000, 8)


def usage_info(answering: Answering, usage: Usage, pricing: Mapping[str, tuple[float, float]]) -> UsageInfo:
    return UsageInfo(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cost_usd=cost_usd(answering.choice.model, usage, pricing),
        estimated=usage.estimated,
    )


def source_info(source: Source) -> SourceInfo:
    """What a client sees of a source: the fields SourceInfo declares (it ignores the rest, the full text
    among them) and a snippet of the text."""
    return SourceInfo(**vars(source), snippet=source.snippet())


def route_info(route: Route, answering: Answering, policy: RoutingPolicy) -> RouteInfo:
    """The route that answered: the tier of the model that did (after a fallback, maybe the other one)."""
    choice = answering.choice
    tier = route.tier if choice in policy.tier_models(route.tier) else _other(route.tier)
    reason = route.reason
    if answering.failed:
        reason += f"; fell back after {'; '.join(answering.failed)}"
    return RouteInfo(tier=tier, model=choice.model, provider=choice.provider, reason=reason)


def answering_meta(
    request_id: str, outcome: CacheOutcome, route: Route, answering: Answering, policy: RoutingPolicy, prompt: Prompt
) -> Meta:
    """The `meta` event of a generated answer, sent once a model answers: its route and the sources shown."""
    shown = [source_info(s) for s in prompt.sources]
    return Meta(request_id, outcome, route_info(route, answering, policy), shown)


def _other(tier: str) -> str:
    return "large" if tier == "small" else "small"


def replayed(hit: CachedAnswer, request_id: str, clock: Clock, semantic: SemanticMatch | None = None) -> list[Event]:
    """A cached answer as this request's events: free now; `saved` is what it cost the first time."""
    clock.first_token = time.perf_counter()
    saved = UsageInfo(**hit.usage)
    meta = Meta(request_id, "hit", RouteInfo(**hit.route), [SourceInfo(**s) for s in hit.sources])
    if semantic is not None:
        info = {"similarity": semantic.similarity, "matched_question_hash": semantic.question_hash}
        if semantic.verified:  # the small tier confirmed it (RAG_SEMANTIC_VERIFY)
            info["verified"] = True
        meta = replace(meta, cache="semantic_hit", semantic=info)
    return [
        meta,
        Token(hit.answer),
        Done(UsageInfo(input_tokens=0, output_tokens=0, cost_usd=0.0), clock.ms(), clock.ttft_ms(), True, saved),
    ]


def cache_entry(question: Question, answer: str, route: RouteInfo, prompt: Prompt, usage: UsageInfo) -> CachedAnswer:
    return CachedAnswer(
        answer=answer,
        route=route.model_dump(),
        sources=[source_info(s).model_dump() for s in prompt.sources],
        usage=usage.model_dump(),
        document_ids=sorted({s.document_id for s in prompt.sources}),
        question_hash=question.hash,
    )


@dataclass(frozen=True)
class RequestFactory:
    """The provider request for a model: the same prompt, whichever candidate answers."""

    question: Question
    prompt: Prompt

    def __call__(self, model: str) -> GenerationRequest:
        return GenerationRequest(
            model=model,
            system=self.prompt.system,
            prompt=self.prompt.user,
            max_tokens=self.question.request.max_tokens,
            temperature=self.question.request.temperature,
            question=self.question.text,
            sources=self.prompt.sources,
        )
