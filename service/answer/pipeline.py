"""The answer pipeline: the request path's seven steps, in order: 1. guardrails, 2. exact cache,
3. semantic cache, 4. retrieval, 5. routing and prompt, 6. streaming generation, 7. cache write.

Identical misses in flight share one generation (service/answer/coalescing.py). A miss's work
before its first token (steps 3-5) runs in a slot of the admission gate (service/answer/admission.py),
which exact hits never wait for. The access log,
metrics and token budget watch the events from outside (service/answer/observe.py). Before the
first event a failure is a domain error (service/errors.py); after it, a `Failed` event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from functools import partial

import asyncpg

from service.answer.admission import AdmissionGate
from service.answer.background import Background
from service.answer.coalescing import Coalescer, Coalescing, Free
from service.answer.events import Admitted, Clock, Done, Event, Failed, Meta, Token
from service.answer.generation import AllProvidersFailedError, Answering, Timeouts, generate
from service.answer.observe import observed, provider_attempts
from service.answer.schemas import CacheOutcome, RagRequest
from service.answer.shapes import Question, RequestFactory, cache_entry, replayed, route_info, source_info, usage_info
from service.embeddings.encoders import Embedder, Vectors
from service.errors import BudgetExceeded, DependencyUnavailable, InvalidRequest, NoProviderAvailable, UnknownModel
from service.observability.metrics import Metrics
from service.observability.tracing import span
from service.policy.guardrails import Action, GuardrailPolicy, check_question
from service.policy.prompt import PROMPT_VERSION, Prompt, build_prompt
from service.policy.routing import Route, RoutingPolicy, UnknownModelError, choose_route
from service.policy.tokens import count_tokens
from service.postgres.retrieval import Filters, Retriever, Source
from service.postgres.semantic_index import SemanticCache, SemanticMatch
from service.postgres.watcher import CorpusWatcher
from service.providers.base import Provider, ProviderError, Usage
from service.redis.answer_cache import AnswerCache, CachedAnswer, KeyParts, cache_key, question_hash, scope_key
from service.redis.limits import TokenBudget
from service.settings import Settings

log = logging.getLogger(__name__)

_POSTGRES_DOWN = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class AnswerService:
    """The request path: `answer` runs the steps below for one request, as a stream of events."""

    def __init__(
        self,
        *,
        settings: Settings,
        embedder: Embedder,
        retriever: Retriever,
        cache: AnswerCache,
        semantic: SemanticCache | None,
        coalescer: Coalescer,
        watcher: CorpusWatcher,
        providers: Mapping[str, Provider],
        policy: RoutingPolicy,
        hash_key: bytes,
        metrics: Metrics | None = None,
        admission: AdmissionGate | None = None,
    ) -> None:
        self.settings = settings
        self.hash_key = hash_key  # keys the question hashes that reach logs, metrics and responses
        self.embedder = embedder
        self.retriever = retriever
        self.cache = cache
        self.semantic = semantic
        self._background = Background()  # work that outlives its request (followers' answers, metrics)
        self.coalescing = Coalescing(coalescer, available=lambda: cache.available, detach=self._background.run)
        self.watcher = watcher
        self.providers = providers
        self.policy = policy
        self.metrics = metrics
        self.admission = admission if admission is not None else AdmissionGate(0)
        self.guardrails = GuardrailPolicy(
            max_chars=settings.question_max_chars,
            max_tokens=settings.question_max_tokens,
            injection=Action(settings.guard_injection),
            pii=settings.guard_pii,
        )
        self.timeouts = Timeouts(settings.first_token_timeout_s, settings.total_timeout_s)
        self._on_attempt = provider_attempts(metrics)

    # -- the path: which steps run, in which order -------------------------------------------
    def answer(self, request: RagRequest, request_id: str, budget: TokenBudget | None = None) -> AsyncIterator[Event]:
        """The answer's events, observed (access log, metrics, budget charges) as they pass."""
        steps = self._steps(request, request_id, budget)
        return observed(steps, request, metrics=self.metrics, budget=budget, detach=self._background.run)

    async def _steps(
        self, request: RagRequest, request_id: str, budget: TokenBudget | None
    ) -> AsyncIterator[Admitted | Event]:
        """Guardrails; then a cached answer, or one generation shared by every identical request in flight."""
        clock = Clock()
        with span("rag.guardrails"):
            question = self.guard(request)
        yield Admitted(question.hash)
        tenant = budget.principal.key_id if budget is not None else ""  # whose turn in the admission queue
        produce = partial(self._cached_or_generated, question, request_id, clock, tenant)
        key: str | None = question.key
        free: Free = partial(self._free, question, request_id, clock, budget)
        if request.cache != "use":  # bypass or refresh: never read the caches, never share the generation
            key, free = None, partial(_checked, budget)
        async for event in self.coalescing.run(key, produce, free=free, request_id=request_id, clock=clock):
            yield event

    async def _free(
        self, question: Question, request_id: str, clock: Clock, budget: TokenBudget | None
    ) -> list[Event] | None:
        """Steps 2-3 while they cost nothing: an exact hit; once out of tokens, a semantic hit too."""
        if (hit := await self.lookup(question.key)) is not None:
            return replayed(hit, request_id, clock)
        try:
            await _checked(budget)
        except BudgetExceeded:  # out of tokens: a semantic hit is still free, nothing else is
            similar = await self._cached(question, request_id, clock, look_again=False)
            if similar is None:
                raise
            return similar
        return None

    async def _cached_or_generated(
        self, question: Question, request_id: str, clock: Clock, tenant: str, look_again: bool
    ) -> AsyncIterator[Event]:
        """The answer this request produces (for its followers too): steps 2-3 once more, else 4-7.

        Steps 3-5 run in an admission slot (raises `Overloaded` past the wait budget); the
        slot is free again before the provider is called.
        """
        cached: list[Event] | None = None
        async with self.admission.slot(tenant):
            if question.request.cache == "use":
                cached = await self._cached(question, request_id, clock, look_again=look_again)
            if cached is None:
                corpus_version = self.watcher.corpus_version
                route, prompt = await self._prepare(question)
        if cached is not None:
            for event in cached:
                yield event
            return
        async for event in self._generate(question, request_id, clock, corpus_version, route, prompt):
            yield event

    async def _cached(
        self, question: Question, request_id: str, clock: Clock, *, look_again: bool
    ) -> list[Event] | None:
        """The exact cache once more (a leader that just finished may have written it), then the semantic cache."""
        if look_again and (hit := await self.lookup(question.key)) is not None:
            return replayed(hit, request_id, clock)
        corpus_version = self.watcher.corpus_version
        similar = await self.semantic_lookup(question)
        if similar is None:
            return None
        answer, match = similar
        same = match.key == question.key  # written between our looks: an exact hit after all
        if not same:  # this wording's next ask is an exact hit: no embedding, no vector search
            self._background.run(self._remember(question, answer, corpus_version))
        return replayed(answer, request_id, clock, semantic=None if same else match)

    async def _remember(self, question: Question, answer: CachedAnswer, corpus_version: int) -> None:
        if self.watcher.corpus_version == corpus_version >= 0:  # not while an invalidation may be running
            await self.cache.put(question.key, replace(answer, question_hash=question.hash))

    async def _prepare(self, question: Question) -> tuple[Route, Prompt]:
        """Steps 4-5: retrieve, route and build the prompt."""
        with span("rag.retrieve") as traced:
            sources = await self.retrieve(question)
            traced.set(sources=len(sources))
        with span("rag.route") as traced:
            route, prompt = self.plan(question, sources)
            traced.set(tier=route.tier, prompt_tokens=prompt.prompt_tokens)
        return route, prompt

    async def _generate(
        self, question: Question, request_id: str, clock: Clock, corpus_version: int, route: Route, prompt: Prompt
    ) -> AsyncIterator[Event]:
        """Steps 6-7: stream from the model, cache the complete answer (if the corpus did not change)."""
        outcome: CacheOutcome = "bypass" if question.request.cache == "bypass" else "miss"
        pieces: list[str] = []
        usage: Usage | None = None
        answering: Answering | None = None
        try:  # 6. streaming generation
            async for item in generate(
                route.candidates, self.providers, RequestFactory(question, prompt), self.timeouts, self._on_attempt
            ):
                if isinstance(item, Answering):
                    answering = item
                    shown = [source_info(s) for s in prompt.sources]
                    yield Meta(request_id, outcome, route_info(route, item, self.policy), shown)
                elif isinstance(item, str):
                    clock.token()
                    pieces.append(item)
                    yield Token(item)
                else:
                    usage = item
        except AllProvidersFailedError as exc:  # nothing was sent yet: refuse before the stream
            raise NoProviderAvailable(str(exc)) from exc
        except (ProviderError, TimeoutError) as exc:
            message = exc.message if isinstance(exc, ProviderError) else "the answer took too long"
            yield Failed("generation_failed", f"generation stopped: {message}")
            return
        assert answering is not None and usage is not None
        spent = usage_info(answering, usage, self.settings.pricing)
        if question.request.cache != "bypass":  # 7. cache write
            with span("rag.cache.write"):
                entry = cache_entry(question, "".join(pieces), route_info(route, answering, self.policy), prompt, spent)
                await self.store(question, corpus_version, entry)
        yield Done(spent, clock.ms(), clock.ttft_ms(), cached=False)

    # -- 1. guardrails (no I/O) ----------------------------------------------------------
    def guard(self, request: RagRequest) -> Question:
        checked = check_question(request.question, self.guardrails, count_tokens)  # raises GuardrailViolation
        try:
            filters = Filters.parse(request.filters)
        except ValueError as exc:
            raise InvalidRequest("invalid_filters", str(exc)) from exc
        if request.model not in ("auto", "small", "large") and request.model not in self.policy.allowed_models():
            allowed = ", ".join(["auto", "small", "large", *self.policy.allowed_models()])
            raise UnknownModel(f"model must be one of: {allowed}")
        parts = KeyParts(
            checked.text, request.top_k, filters, request.model, request.max_tokens, request.temperature, PROMPT_VERSION
        )
        return Question(
            request=request,
            text=checked.text,
            filters=filters,
            key=cache_key(parts),
            scope=scope_key(parts),
            hash=question_hash(checked.text, self.hash_key),
            flags=checked.flags,
        )

    # -- 2. exact cache ------------------------------------------------------------------
    async def lookup(self, key: str) -> CachedAnswer | None:
        with span("rag.cache.lookup") as traced:
            hit = await self.cache.get(key)
            traced.set(hit=hit is not None)
        return hit

    # -- 3. semantic cache --------------------------------------------------------------
    async def semantic_lookup(self, question: Question) -> tuple[CachedAnswer, SemanticMatch] | None:
        """A cached answer to a question that means the same, or None. Never fails the request."""
        if self.semantic is None or not self.cache.available:
            return None
        with span("rag.semantic_cache") as traced:
            try:
                vector = await self.embed(question)
                for match in await self.semantic.candidates(question.scope, vector, question.text):
                    hit = await self.cache.get(match.key)
                    if hit is not None:
                        traced.set(hit=True, similarity=match.similarity)
                        return hit, match
                    await self.semantic.forget(match.key)  # its answer was invalidated or expired
            except _POSTGRES_DOWN as exc:
                log.warning("semantic cache skipped: %s", type(exc).__name__)
                traced.set(skipped=type(exc).__name__)
            traced.set(hit=False)
        return None

    async def embed(self, question: Question) -> Vectors:
        if question.vector is None:
            try:
                with span("rag.embed"):
                    question.vector = (await self.embedder.embed([question.text]))[0]
            except Exception as exc:  # a remote embedding endpoint that is down
                log.warning("embedding failed: %s", type(exc).__name__)
                message = "cannot embed the question right now"
                raise DependencyUnavailable("embedding", "embedding_unavailable", message) from exc
        return question.vector

    # -- 4. retrieval --------------------------------------------------------------------
    async def retrieve(self, question: Question) -> list[Source]:
        vector = await self.embed(question)
        try:
            return await self.retriever.search(
                vector, question.text, top_k=question.request.top_k, filters=question.filters
            )
        except _POSTGRES_DOWN as exc:
            log.warning("retrieval failed: %s", type(exc).__name__)
            message = "the document store is unavailable"
            raise DependencyUnavailable("database", "database_unavailable", message) from exc

    # -- 5. routing and prompt -------------------------------------------------------------
    def plan(self, question: Question, sources: list[Source]) -> tuple[Route, Prompt]:
        prompt = build_prompt(question.text, sources, context_budget=self.settings.context_token_budget)
        try:
            route = choose_route(
                question.request.model,
                question=question.text,
                prompt_tokens=prompt.prompt_tokens,
                max_tokens=question.request.max_tokens,
                policy=self.policy,
            )
        except UnknownModelError as exc:
            raise UnknownModel(str(exc)) from exc
        return route, prompt

    # -- 7. cache write -----------------------------------------------------------------
    async def store(self, question: Question, corpus_version: int, entry: CachedAnswer) -> None:
        """The answer under its key, and its question in the semantic index, unless the corpus changed meanwhile."""
        if self.watcher.corpus_version != corpus_version or corpus_version < 0:
            log.info("corpus changed while answering; not caching %s", question.hash)
            return
        # Shielded: a client that disconnects right after the last token must not leave half a write.
        if await asyncio.shield(self.cache.put(question.key, entry)) and self.semantic and question.vector is not None:
            try:
                await self.semantic.add(question.key, question.scope, question.text, question.hash, question.vector)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("semantic index not updated: %s", type(exc).__name__)


async def _checked(budget: TokenBudget | None) -> None:
    """Raises `BudgetExceeded` when the caller's tokens for today are spent (a generation would cost)."""
    if budget is not None:
        await budget.check()
