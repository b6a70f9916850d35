"""The answer pipeline: SPEC's request path, one step per method, in order.

`AnswerService.answer` is an async generator of events. Everything up to the first
event (guardrails, cache, retrieval, routing, and the wait for the model's first token)
raises `APIError`, which the HTTP layer turns into a JSON error with a status code; once
the first event exists the response is a stream and failures become an `Failed` event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import asyncpg
from redis.exceptions import RedisError

from service.answer.coalescing import CANCELLED, Coalescer, LeaderLostError, Lease
from service.answer.events import Done, Event, Failed, Meta, Token
from service.answer.generation import AllProvidersFailedError, Answering, Timeouts, generate
from service.answer.schemas import CacheOutcome, RagRequest, RouteInfo, SourceInfo, UsageInfo
from service.embeddings.encoders import Embedder, Vectors
from service.http.errors import APIError
from service.observability.logs import note
from service.observability.metrics import Metrics, failure_stage
from service.observability.tracing import Span, Tracing, span
from service.policy.guardrails import Action, GuardrailPolicy, GuardrailViolation, check_question
from service.policy.prompt import PROMPT_VERSION, Prompt, build_prompt
from service.policy.routing import ModelChoice, Route, RoutingPolicy, UnknownModelError, decide
from service.policy.tokens import count_tokens
from service.postgres.retrieval import Filters, Retriever, Source
from service.postgres.semantic_index import SemanticCache, SemanticMatch
from service.postgres.watcher import CorpusWatcher
from service.providers.base import GenerationRequest, Provider, ProviderError, Usage
from service.redis.answer_cache import AnswerCache, CachedAnswer, KeyParts, cache_key, question_hash, scope_key
from service.redis.limits import TokenBudget
from service.settings import Settings

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"
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


@dataclass
class _Clock:
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def ms(self, at: float | None = None) -> float:
        return round(((at or time.perf_counter()) - self.started) * 1000, 2)

    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else self.ms(self.first_token)


def cost_usd(model: str, usage: Usage, pricing: Mapping[str, tuple[float, float]]) -> float:
    per_in, per_out = pricing.get(model, (0.0, 0.0))
    return round((usage.input_tokens * per_in + usage.output_tokens * per_out) / 1_000_000, 8)


def access_fields(event: Event) -> dict[str, Any]:
    """What the access log line says about an answer event: outcome, route, usage; never text."""
    if isinstance(event, Meta):
        route = event.route
        return {"cache": event.cache, "tier": route.tier, "provider": route.provider, "model": route.model}
    if isinstance(event, Done):
        usage = event.usage
        fields: dict[str, Any] = {
            "ttft_ms": event.ttft_ms,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cost_usd": usage.cost_usd,
        }
        if event.saved is not None:  # a hit or a coalesced answer: what the first generation cost
            fields["saved_cost_usd"] = event.saved.cost_usd
        return fields
    if isinstance(event, Failed):
        return {"error": event.code}
    return {}


def source_info(source: Source) -> SourceInfo:
    return SourceInfo(
        n=source.n,
        chunk_id=source.chunk_id,
        document=source.document,
        source=source.source,
        score=source.score,
        snippet=source.snippet(),
    )


_TAKEOVER_ATTEMPTS = 3


class _TakeOverError(Exception):
    """A followed leader vanished before its first event; this request may lead instead."""


class AnswerService:
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
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.hash_key = hash_key  # keys the question hashes that reach logs, metrics and responses
        self.embedder = embedder
        self.retriever = retriever
        self.cache = cache
        self.semantic = semantic
        self.coalescer = coalescer
        self._background: set[asyncio.Task[None]] = set()
        self.watcher = watcher
        self.providers = providers
        self.policy = policy
        self.metrics = metrics
        self.tracing = tracing or Tracing()
        self.guardrails = GuardrailPolicy(
            max_chars=settings.question_max_chars,
            max_tokens=settings.question_max_tokens,
            injection=Action(settings.guard_injection),
            pii=settings.guard_pii,
        )
        self.timeouts = Timeouts(settings.first_token_timeout_s, settings.total_timeout_s)

    def answer(self, request: RagRequest, request_id: str, budget: TokenBudget | None = None) -> AsyncIterator[Event]:
        """The events of `_answer_counted`, under a `rag.request` span when tracing is on (observability/tracing.py)."""
        key_id = budget.principal.key_id if budget is not None else None
        events = self._answer_counted(request, request_id, budget)
        return self.tracing.stream(events, _describe_root, request_id=request_id, key_id=key_id)

    async def _answer_counted(
        self, request: RagRequest, request_id: str, budget: TokenBudget | None = None
    ) -> AsyncIterator[Event]:
        """SPEC's request path, with identical in-flight misses coalesced onto one generation.

        Every outcome is counted for /metrics and the dashboard, off the request's path.
        Only answers generated for this request are charged to the caller's token budget.
        """
        clock = _Clock()
        meta: Meta | None = None
        note(question_chars=len(request.question))  # for the request's access log line (service.observability.logs)
        try:
            with span("rag.guardrails"):
                question = self.guard(request)
            note(question_hash=question.hash)
            async for event in self._answer(question, request_id, clock, budget):
                note(**access_fields(event))
                if isinstance(event, Meta):
                    meta = event
                elif isinstance(event, Done) and meta is not None:
                    if budget is not None and meta.cache in ("miss", "bypass"):
                        self._detached(budget.charge(event.usage.input_tokens + event.usage.output_tokens))
                    if self.metrics is not None:
                        self._detached(self.metrics.record(meta, event, question.hash))
                elif isinstance(event, Failed) and self.metrics is not None:
                    self._detached(self.metrics.failed(code=event.code, stage="stream"))
                yield event
        except APIError as exc:
            if self.metrics is not None:
                self._detached(self.metrics.failed(code=exc.code, stage=failure_stage(exc.status, exc.code)))
            raise

    async def _answer(
        self, question: Question, request_id: str, clock: _Clock, budget: TokenBudget | None
    ) -> AsyncIterator[Event]:
        request = question.request
        if request.cache != "use":
            if budget is not None:
                await budget.check()
            async for event in self._produce_and_consume(question, request_id, clock, None):
                yield event
            return
        for _ in range(_TAKEOVER_ATTEMPTS):
            hit = await self.lookup(question.key)
            if hit is not None:
                for event in self.replay(hit, request_id, clock):
                    yield event
                return
            if budget is not None:
                try:
                    await budget.check()
                except APIError:  # out of tokens: a semantic hit is still free, nothing else is
                    similar = await self._cached_events(question, request_id, clock, look_again=False)
                    if similar is None:
                        raise
                    for event in similar:
                        yield event
                    return
            # Identical questions in flight join one leader before anything costly (embedding) runs.
            role = await self._lead_or_follow(question.key)
            if role == "follow":
                try:
                    async for event in self._follow(question, request_id, clock):
                        yield event
                    return
                except _TakeOverError:
                    continue  # the leader died before showing anything: try to lead ourselves
            try:
                cached = await self._cached_events(question, request_id, clock, look_again=role is not None)
            except BaseException as exc:  # an error, or our client leaving: never strand followers on a live lease
                if role is not None:
                    failure = (
                        Failed(exc.code, exc.message)
                        if isinstance(exc, APIError)
                        else Failed(CANCELLED, "the request leading this answer went away")
                    )
                    self._detached(self._release(role, [failure]))
                raise
            if cached is not None:
                if role is not None:  # our followers get the cached answer too
                    self._detached(self._release(role, cached))
                for event in cached:
                    yield event
                return
            async for event in self._produce_and_consume(question, request_id, clock, role):
                yield event
            return
        raise APIError(503, "coalescing_failed", "could not join or start a generation", {"Retry-After": "1"})

    async def _cached_events(
        self, question: Question, request_id: str, clock: _Clock, *, look_again: bool
    ) -> list[Event] | None:
        """The exact cache once more (a leader that just finished may have written it), then the semantic cache."""
        if look_again and (hit := await self.lookup(question.key)) is not None:
            return self.replay(hit, request_id, clock)
        generation = self.watcher.generation
        similar = await self.semantic_lookup(question)
        if similar is None:
            return None
        answer, match = similar
        same = match.key == question.key  # written between our looks: an exact hit after all
        if not same:  # this wording's next ask is an exact hit: no embedding, no vector search
            self._detached(self._remember(question, answer, generation))
        return self.replay(answer, request_id, clock, semantic=None if same else match)

    async def _remember(self, question: Question, answer: CachedAnswer, generation: int) -> None:
        if self.watcher.generation == generation >= 0:  # not while an invalidation may be running
            await self.cache.put(question.key, replace(answer, question_hash=question.hash))

    async def _lead_or_follow(self, key: str) -> Lease | Literal["follow"] | None:
        if not self.cache.available:
            return None
        try:
            lease = await self.coalescer.lead(key)
        except (RedisError, OSError):
            return None  # no Redis, no coalescing: answer on our own
        return "follow" if lease is None else lease

    async def _produce_and_consume(
        self, question: Question, request_id: str, clock: _Clock, lease: Lease | None
    ) -> AsyncIterator[Event]:
        """Generate in a task of its own, so the answer can outlive this request for its followers."""
        queue: asyncio.Queue[Event | APIError | None] = asyncio.Queue()
        producer = asyncio.create_task(self._produce(question, request_id, clock, lease, queue))
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, APIError):
                    raise item
                yield item
        finally:
            if not producer.done():
                # Our client left. Nothing may be awaited here (the response's cancel scope would
                # cancel it again), so the decision runs in a task of its own.
                if lease is None:
                    producer.cancel()  # closes the provider connection at once
                else:
                    self._detached(self._abandon_unless_followed(lease, producer))

    async def _release(self, lease: Lease, events: list[Event]) -> None:
        """Publish the last events to followers and give the lease up; detached, so a leaving client cannot stop it."""
        for event in events:
            lease.publish(event)
        await lease.close()

    def _attempted(self, choice: ModelChoice, outcome: str, status: int | None) -> None:
        if self.metrics is not None:
            self.metrics.provider_attempt(provider=choice.provider, model=choice.model, outcome=outcome, status=status)

    async def _abandon_unless_followed(self, lease: Lease, producer: asyncio.Task[None]) -> None:
        """Keep generating only if other requests follow this answer; otherwise cancel it."""
        if await lease.abandon():
            producer.cancel()

    def _detached(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)  # keep a reference until done
        task.add_done_callback(self._background.discard)

    async def _produce(
        self,
        question: Question,
        request_id: str,
        clock: _Clock,
        lease: Lease | None,
        queue: asyncio.Queue[Event | APIError | None],
    ) -> None:
        try:
            async for event in self._generate(question, request_id, clock):
                queue.put_nowait(event)
                if lease is not None:
                    lease.publish(event)
        except APIError as exc:
            queue.put_nowait(exc)
            if lease is not None:
                lease.publish(Failed(exc.code, exc.message))
        finally:
            queue.put_nowait(None)
            if lease is not None:
                await lease.close()

    async def _follow(self, question: Question, request_id: str, clock: _Clock) -> AsyncIterator[Event]:
        """Relay another request's generation of the same answer, live."""
        shown = False
        try:
            async for event in self.coalescer.follow(question.key):
                if isinstance(event, Failed) and not shown:
                    raise APIError(503, event.code, event.message, {"Retry-After": RETRY_AFTER_S})
                if isinstance(event, Meta):
                    event = replace(event, request_id=request_id, cache="coalesced")
                elif isinstance(event, Token) and clock.first_token is None:
                    clock.first_token = time.perf_counter()
                elif isinstance(event, Done):
                    free = UsageInfo(input_tokens=0, output_tokens=0, cost_usd=0.0)
                    saved = event.saved if event.saved is not None else event.usage
                    event = Done(free, clock.ms(), clock.ttft_ms(), cached=False, saved=saved)
                shown = True
                yield event
        except (LeaderLostError, RedisError, OSError) as exc:
            if not shown:
                raise _TakeOverError from exc
            yield Failed("leader_lost", "the shared generation of this answer stopped; please retry")

    async def _generate(self, question: Question, request_id: str, clock: _Clock) -> AsyncIterator[Event]:
        """Steps 4-7: retrieve, route, stream from the model, cache the complete answer."""
        generation = self.watcher.generation
        with span("rag.retrieve") as traced:
            sources = await self.retrieve(question)
            traced.set(sources=len(sources))
        with span("rag.route") as traced:
            route, prompt = self.plan(question, sources)
            traced.set(tier=route.tier, prompt_tokens=prompt.prompt_tokens)
        outcome: CacheOutcome = "bypass" if question.request.cache == "bypass" else "miss"
        pieces: list[str] = []
        usage: Usage | None = None
        answering: Answering | None = None
        try:
            async for item in generate(
                route.candidates, self.providers, _RequestFactory(question, prompt), self.timeouts, self._attempted
            ):
                if isinstance(item, Answering):
                    answering = item
                    sources_info = [source_info(s) for s in prompt.sources]
                    yield Meta(request_id, outcome, self._route_info(route, item), sources_info)
                elif isinstance(item, str):
                    if clock.first_token is None:
                        clock.first_token = time.perf_counter()
                    pieces.append(item)
                    yield Token(item)
                else:
                    usage = item
        except AllProvidersFailedError as exc:  # nothing was sent yet: a plain 503
            raise APIError(503, "providers_unavailable", str(exc), {"Retry-After": RETRY_AFTER_S}) from exc
        except (ProviderError, TimeoutError) as exc:
            message = exc.message if isinstance(exc, ProviderError) else "the answer took too long"
            yield Failed("generation_failed", f"generation stopped: {message}")
            return
        assert answering is not None and usage is not None
        usage_info = UsageInfo(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_usd=cost_usd(answering.choice.model, usage, self.settings.pricing),
            estimated=usage.estimated,
        )
        if question.request.cache != "bypass":
            route_info = self._route_info(route, answering)
            with span("rag.cache.write"):
                await self.store(question, generation, "".join(pieces), route_info, prompt, usage_info)
        yield Done(usage_info, clock.ms(), clock.ttft_ms(), cached=False)

    # -- 1. guardrails (no I/O) ----------------------------------------------------------
    def guard(self, request: RagRequest) -> Question:
        try:
            checked = check_question(request.question, self.guardrails, count_tokens)
        except GuardrailViolation as exc:
            raise APIError(400, exc.code, exc.message) from exc
        try:
            filters = Filters.parse(request.filters)
        except ValueError as exc:
            raise APIError(422, "invalid_filters", str(exc)) from exc
        if request.model not in ("auto", "small", "large") and request.model not in self.policy.allowed_models():
            allowed = ", ".join(["auto", "small", "large", *self.policy.allowed_models()])
            raise APIError(422, "unknown_model", f"model must be one of: {allowed}")
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

    def replay(
        self, hit: CachedAnswer, request_id: str, clock: _Clock, semantic: SemanticMatch | None = None
    ) -> list[Event]:
        clock.first_token = time.perf_counter()
        saved = UsageInfo(**hit.usage)
        meta = Meta(request_id, "hit", RouteInfo(**hit.route), [SourceInfo(**s) for s in hit.sources])
        if semantic is not None:
            info = {"similarity": semantic.similarity, "matched_question_hash": semantic.question_hash}
            meta = replace(meta, cache="semantic_hit", semantic=info)
        return [
            meta,
            Token(hit.answer),
            Done(UsageInfo(input_tokens=0, output_tokens=0, cost_usd=0.0), clock.ms(), clock.ttft_ms(), True, saved),
        ]

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
            except APIError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("semantic cache skipped: %s", type(exc).__name__)
                traced.set(skipped=type(exc).__name__)
            traced.set(hit=False)
        return None

    async def embed(self, question: Question) -> Vector:
        if question.vector is None:
            try:
                with span("rag.embed"):
                    question.vector = (await self.embedder.embed([question.text]))[0]
            except Exception as exc:  # a remote embedding endpoint that is down
                log.warning("embedding failed: %s", type(exc).__name__)
                raise APIError(
                    503, "embedding_unavailable", "cannot embed the question right now", {"Retry-After": RETRY_AFTER_S}
                ) from exc
        return question.vector

    # -- 4. retrieval --------------------------------------------------------------------
    async def retrieve(self, question: Question) -> list[Source]:
        vector = await self.embed(question)
        try:
            return await self.retriever.search(
                vector, question.text, top_k=question.request.top_k, filters=question.filters
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("retrieval failed: %s", type(exc).__name__)
            raise APIError(
                503, "database_unavailable", "the document store is unavailable", {"Retry-After": RETRY_AFTER_S}
            ) from exc

    # -- 5. routing and prompt -------------------------------------------------------------
    def plan(self, question: Question, sources: list[Source]) -> tuple[Route, Prompt]:
        prompt = build_prompt(question.text, sources, context_budget=self.settings.context_token_budget)
        try:
            route = decide(
                question.request.model,
                question=question.text,
                prompt_tokens=prompt.prompt_tokens,
                max_tokens=question.request.max_tokens,
                policy=self.policy,
            )
        except UnknownModelError as exc:
            raise APIError(422, "unknown_model", str(exc)) from exc
        return route, prompt

    def _route_info(self, route: Route, answering: Answering) -> RouteInfo:
        choice = answering.choice
        tier = route.tier if choice in self.policy.tier_models(route.tier) else _other(route.tier)
        reason = route.reason
        if answering.failed:
            reason += f"; fell back after {'; '.join(answering.failed)}"
        return RouteInfo(tier=tier, model=choice.model, provider=choice.provider, reason=reason)

    # -- 7. cache write -----------------------------------------------------------------
    async def store(
        self, question: Question, generation: int, answer: str, route: RouteInfo, prompt: Prompt, usage: UsageInfo
    ) -> None:
        if self.watcher.generation != generation or generation < 0:
            log.info("corpus changed while answering; not caching %s", question.hash)
            return
        entry = CachedAnswer(
            answer=answer,
            route=route.model_dump(),
            sources=[source_info(s).model_dump() for s in prompt.sources],
            usage=usage.model_dump(),
            document_ids=sorted({s.document_id for s in prompt.sources}),
            question_hash=question.hash,
        )
        # Shielded: a client that disconnects right after the last token must not leave half a write.
        if await asyncio.shield(self.cache.put(question.key, entry)) and self.semantic and question.vector is not None:
            try:
                await self.semantic.add(question.key, question.scope, question.text, question.hash, question.vector)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("semantic index not updated: %s", type(exc).__name__)


@dataclass(frozen=True)
class _RequestFactory:
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


def _other(tier: str) -> str:
    return "large" if tier == "small" else "small"


def _describe_root(root: Span, item: Event | BaseException) -> None:
    """What a traced answer's root span says: the access line's fields (outcome, route, usage) or the error."""
    if isinstance(item, Token):
        return
    if isinstance(item, APIError):
        root.set(error=item.code, http_status=item.status)
    elif not isinstance(item, BaseException):
        root.set(**access_fields(item))
        if isinstance(item, Failed):
            root.error(item.code)
