"""The answer pipeline: the request path's seven steps, in order: 1. guardrails (and, for a follow-up, its
standalone question: service/answer/question.py), 2. exact cache, 3. semantic cache (its optional verifier:
service/answer/verification.py), 4. retrieval, 5. routing and prompt, 6. streaming generation, 7. cache write.

Identical misses in flight share one generation (service/answer/coalescing.py). A miss's work
before its first token (steps 3-5) runs in a slot of the admission gate (service/answer/admission.py),
which exact hits never wait for. A generation (never a follower) holds one of its key's in-flight
slots while it runs; it reserves its key's tokens before calling a model and settles them as it ends
(service/answer/budgeting.py). The access log and metrics watch the events from outside
(service/answer/observe.py). Before the first event a failure is a domain error
(service/errors.py); after it, a `Failed` event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from dataclasses import replace
from functools import partial

from service.answer.admission import AdmissionGate
from service.answer.background import Background
from service.answer.budgeting import checked, in_flight, reserved, settling, tenant
from service.answer.coalescing import Coalescer, Coalescing, Free
from service.answer.events import Admitted, Clock, Done, Event, Failed, Meta, Token
from service.answer.generation import AllProvidersFailedError, Answering, Models
from service.answer.observe import observed
from service.answer.question import QuestionReader
from service.answer.schemas import CacheOutcome, RagRequest
from service.answer.shapes import Question, RequestFactory, answering_meta, cache_entry, planned, replayed, usage_info
from service.answer.verification import Verifier
from service.embeddings.encoders import Embedder, Vectors
from service.errors import BudgetExceeded, DependencyUnavailable, NoProviderAvailable, Overloaded
from service.observability.metrics import Metrics
from service.observability.tracing import span
from service.policy.collections import DEFAULT
from service.policy.prompt import Prompt
from service.policy.routing import Route, RoutingPolicy
from service.postgres.db import DATABASE_ERRORS
from service.postgres.retrieval import Retriever, Source
from service.postgres.semantic_index import SemanticCache, SemanticMatch
from service.postgres.watcher import CorpusWatcher
from service.providers.base import ProviderError, Usage
from service.redis.answer_cache import AnswerCache, CachedAnswer
from service.redis.limits import TokenBudget
from service.settings import Settings

log = logging.getLogger(__name__)


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
        models: Models,
        policy: RoutingPolicy,
        questions: QuestionReader,
        metrics: Metrics | None = None,
        admission: AdmissionGate | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.settings = settings
        self.questions = questions  # steps 1 and 1b (service/answer/question.py)
        self.embedder = embedder
        self.retriever = retriever
        self.cache = cache
        self.semantic = semantic
        self.verifier = verifier or Verifier()  # step 3's optional second opinion (service/answer/verification.py)
        self._background = Background()  # work that outlives its request (followers' answers, metrics)
        self.coalescing = Coalescing(coalescer, available=lambda: cache.available, detach=self._background.run)
        self.watcher = watcher
        self.models = models  # step 6: the providers, their timeouts, the attempts' observer
        self.policy = policy
        self.metrics = metrics
        self.admission = admission if admission is not None else AdmissionGate(0)

    # -- the path: which steps run, in which order -------------------------------------------
    def answer(
        self,
        request: RagRequest,
        request_id: str,
        budget: TokenBudget | None = None,
        granted: Sequence[str] = (DEFAULT,),
    ) -> AsyncIterator[Event]:
        """The answer's events, observed (access log, metrics) as they pass; `granted`: what the key may read."""
        steps = self._steps(request, request_id, budget, granted)
        return observed(steps, request, metrics=self.metrics, detach=self._background.run)

    async def _steps(
        self, request: RagRequest, request_id: str, budget: TokenBudget | None, granted: Sequence[str]
    ) -> AsyncIterator[Admitted | Event]:
        """Guardrails; then a cached answer, or one generation shared by every identical request in flight."""
        clock = Clock()
        with span("rag.guardrails"):
            question = self.questions.guard(request, granted)
        question = await self.questions.understand(question, budget)  # a model rewrite is charged to it
        yield Admitted(question.hash, question.permissions.collections)
        produce = partial(in_flight, budget, partial(self._cached_or_generated, question, request_id, clock, budget))
        key: str | None = question.key
        free: Free = partial(self._free, question, request_id, clock, budget)
        if request.cache != "use":  # bypass or refresh: never read the caches, never share the generation
            key, free = None, partial(checked, budget)
        async for event in self.coalescing.run(key, produce, free=free, request_id=request_id, clock=clock):
            if isinstance(event, Meta):  # this request's rewrite, whoever produced the answer
                event = replace(event, standalone_question=question.standalone_question)
            yield event

    async def _free(
        self, question: Question, request_id: str, clock: Clock, budget: TokenBudget | None
    ) -> list[Event] | None:
        """Steps 2-3 while they cost nothing: an exact hit; once out of tokens, a semantic hit too."""
        if (hit := await self.lookup(question.key)) is not None:
            return replayed(hit, request_id, clock)
        try:
            await checked(budget)
        except BudgetExceeded:  # out of tokens: a semantic hit is still free, nothing else is
            with suppress(Overloaded):  # its lookup (an embedding, a vector search) queues like a miss's work
                async with self.admission.slot(tenant(budget)):
                    if (similar := await self._cached(question, request_id, clock, budget, False)) is not None:
                        return similar
            raise
        return None  # a miss: the budget was just checked

    async def _cached_or_generated(
        self, question: Question, request_id: str, clock: Clock, budget: TokenBudget | None, look_again: bool
    ) -> AsyncIterator[Event]:
        """The answer this request produces (for its followers too): steps 2-3 once more, else 4-7.

        Steps 3-5 run in an admission slot (raises `Overloaded` past the wait budget); the slot is
        free again before the provider is called. This runs in the coalescing producer, which
        outlives a leader whose client left while others follow; the key's tokens are reserved
        before the model is called and settled as the answer ends, so one that ends early
        (disconnect, cancellation, error) is charged what was generated, never more than reserved.
        """
        cached: list[Event] | None = None
        async with self.admission.slot(tenant(budget)):
            if question.request.cache == "use":
                cached = await self._cached(question, request_id, clock, budget, look_again)
            if cached is None:
                corpus_version = self.watcher.corpus_version
                route, prompt = self.plan(question, await self.retrieve(question))
        if cached is not None:
            for event in cached:
                yield event
            return
        reservation = await reserved(budget, prompt.prompt_tokens + question.request.max_tokens)
        answer = self._generate(question, request_id, clock, corpus_version, route, prompt)
        async for event in settling(answer, reservation, prompt.prompt_tokens):
            yield event

    async def _cached(
        self, question: Question, request_id: str, clock: Clock, budget: TokenBudget | None, look_again: bool
    ) -> list[Event] | None:
        """The exact cache once more (a leader that just finished may have written it), then the semantic cache."""
        if look_again and (hit := await self.lookup(question.key)) is not None:
            return replayed(hit, request_id, clock)
        corpus_version = self.watcher.corpus_version
        similar = await self.semantic_lookup(question, budget)
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

    async def _generate(
        self, question: Question, request_id: str, clock: Clock, corpus_version: int, route: Route, prompt: Prompt
    ) -> AsyncIterator[Event]:
        """Steps 6-7: stream from the model, cache the complete answer (if the corpus did not change)."""
        outcome: CacheOutcome = "bypass" if question.request.cache == "bypass" else "miss"
        pieces: list[str] = []
        usage: Usage | None = None
        answering: Answering | None = None
        meta: Meta | None = None  # sent once a model answers; its route is cached with the answer
        try:  # 6. streaming generation
            async for item in self.models.generate(route.candidates, RequestFactory(question, prompt)):
                if isinstance(item, Answering):
                    answering, meta = item, answering_meta(request_id, outcome, route, item, self.policy, prompt)
                    yield meta
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
        assert answering is not None and meta is not None and usage is not None
        spent = usage_info(answering, usage, self.settings.pricing)
        if question.request.cache != "bypass":  # 7. cache write
            with span("rag.cache.write"):
                entry = cache_entry(question, "".join(pieces), meta.route, prompt, spent)
                await self.store(question, corpus_version, entry)
        yield Done(spent, clock.ms(), clock.ttft_ms(), cached=False)

    # -- 2. exact cache ------------------------------------------------------------------
    async def lookup(self, key: str) -> CachedAnswer | None:
        with span("rag.cache.lookup") as traced:
            hit = await self.cache.get(key)
            traced.set(hit=hit is not None)
        return hit

    # -- 3. semantic cache --------------------------------------------------------------
    async def semantic_lookup(
        self, question: Question, budget: TokenBudget | None = None
    ) -> tuple[CachedAnswer, SemanticMatch] | None:
        """A cached answer to a question that means the same (a verifier's call charged to `budget`), or None."""
        if self.semantic is None or not self.cache.available:
            return None
        with span("rag.semantic_cache") as traced:
            try:
                vector, check = await self.embed(question), self.verifier.check(question.text, budget)
                for match in await self.semantic.candidates(question.scope, vector, question.text, self.verifier.floor):
                    if (hit := await self.cache.get(match.key)) is None:
                        await self.semantic.forget(match.key)  # its answer was invalidated or expired
                    elif (confirmed := await check(match)) is not None:
                        traced.set(hit=True, similarity=match.similarity)
                        return hit, confirmed
            except DATABASE_ERRORS as exc:
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
        with span("rag.retrieve") as traced:
            vector = await self.embed(question)
            try:
                sources = await self.retriever.search(
                    vector,
                    question.text,
                    top_k=question.request.top_k,
                    filters=question.filters,
                    collections=question.permissions.names,
                )
            except DATABASE_ERRORS as exc:
                log.warning("retrieval failed: %s", type(exc).__name__)
                message = "the document store is unavailable"
                raise DependencyUnavailable("database", "database_unavailable", message) from exc
            traced.set(sources=len(sources))
        return sources

    # -- 5. routing and prompt (no I/O: service/answer/shapes.py) ----------------------------
    def plan(self, question: Question, sources: list[Source]) -> tuple[Route, Prompt]:
        with span("rag.route") as traced:
            route, prompt = planned(question, sources, self.policy, self.settings)
            traced.set(tier=route.tier, prompt_tokens=prompt.prompt_tokens)
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
            except DATABASE_ERRORS as exc:
                log.warning("semantic index not updated: %s", type(exc).__name__)
