"""Semantic candidates verified by the small tier (RAG_SEMANTIC_VERIFY=small): the real app, Postgres,
Valkey and all-MiniLM-L6-v2, and the loopback model behind the real Anthropic SDK answering yes or no."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from service.answer.verification import Verifier
from service.embeddings.encoders import LocalEmbedder
from service.http.app import build_providers, routing_policy
from service.http.auth import Principal
from service.observability.logs import access_record
from service.policy.semantic_verify import VERIFY_SYSTEM, verify_prompt
from service.policy.tokens import count_tokens
from service.postgres.semantic_index import SemanticMatch
from service.redis.client import worker_client
from service.redis.keyspace import KEYS
from service.redis.limits import Limiter, TokenBudget
from service.redis.verdicts import VerdictCache
from service.settings import Settings
from tests.support.answers import FLUSH, ask, charged, running, seed, with_providers
from tests.support.provider_server import Behavior, CallRecord, ProviderServer
from tests.support.servers import make_key

ANSWER = "Run rag-admin cache flush [1]."
PARAPHRASE = "how can i flush the cache"  # the judge's score: 0.95
CLEAR = "how do i clear the cache"  # 0.86


def verifying(settings: Settings, provider: ProviderServer, verdicts: list[str], **overrides: Any) -> Settings:
    """The app with verification on; the loopback model says `verdicts` in turn when asked to verify."""

    def scripted(body: Mapping[str, Any]) -> str:
        return verdicts.pop(0) if VERIFY_SYSTEM in str(body.get("system")) else ANSWER

    provider.default = Behavior(text=scripted)
    return with_providers(settings, provider, semantic_verify="small", **overrides)


def verify_calls(provider: ProviderServer) -> list[CallRecord]:
    return [c for c in provider.calls_to("messages") if VERIFY_SYSTEM in str(c.body.get("system"))]


async def test_a_yes_serves_a_candidate_under_the_threshold_as_a_verified_semantic_hit(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    await seed(settings, local_embedder)
    served = verifying(settings, provider, ["yes"], semantic_cache_threshold=0.95, semantic_verify_floor=0.5)
    async with running(served, local_embedder) as http:
        assert (await ask(http, FLUSH)).meta["cache"] == "miss"
        assert verify_calls(provider) == []  # nothing cached yet: nothing to verify
        clear = await ask(http, CLEAR)  # the judge alone would refuse it (0.86 < 0.95)
        assert clear.meta["cache"] == "semantic_hit" and clear.meta["semantic"]["verified"] is True, clear.meta
        assert clear.text == ANSWER
        (call,) = verify_calls(provider)
        assert call.body["model"] == "claude-haiku-4-5"  # the small tier
        prompt = str(call.body["messages"])
        assert CLEAR in prompt and FLUSH in prompt


async def test_a_no_is_not_served_and_the_miss_path_answers(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    await seed(settings, local_embedder)
    async with running(verifying(settings, provider, ["no"]), local_embedder) as http:
        await ask(http, FLUSH)
        para = await ask(http, PARAPHRASE)  # above the threshold: with verification on, it needs a yes too
        assert para.meta["cache"] == "miss" and para.text == ANSWER, para.meta  # generated, not replayed
        assert len(verify_calls(provider)) == 1


async def test_a_failing_or_hanging_verifier_means_no_hit_and_the_miss_path_answers(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    await seed(settings, local_embedder)
    async with running(verifying(settings, provider, [], semantic_verify_timeout_s=0.5), local_embedder) as http:
        await ask(http, FLUSH)
        provider.enqueue(Behavior(status=400))  # the verification call fails (not retried)
        failed = await ask(http, PARAPHRASE)
        assert failed.meta["cache"] == "miss" and failed.text == ANSWER, failed.meta
        provider.enqueue(Behavior(hang=True))  # never answers: its own timeout ends it
        hung = await ask(http, CLEAR)
        assert hung.meta["cache"] == "miss" and hung.text == ANSWER, hung.meta
        assert len(verify_calls(provider)) == 2


async def test_a_verification_is_charged_to_the_key(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    await seed(settings, local_embedder)
    served = verifying(settings, provider, ["yes"])
    key = await make_key(settings, "query", tokens_per_day=100_000)
    async with running(served, local_embedder, key) as http:
        await ask(http, FLUSH)
        before = await charged(str(settings.redis_url), key)
        para = await ask(http, PARAPHRASE)
        assert para.meta["cache"] == "semantic_hit" and para.of("done")[0]["usage"]["input_tokens"] == 0
        assert await charged(str(settings.redis_url), key) > before  # the verification's tokens


async def test_a_verdict_is_remembered_for_as_long_as_its_entry_lives(
    settings: Settings, provider: ProviderServer
) -> None:
    """A repeat makes no call: the verdict is in Redis under the entry and the wording, expiring with the entry."""
    served = verifying(settings, provider, ["no"])
    client = worker_client(str(settings.redis_url), max_connections=4, wait_s=1.0)
    await client.set(KEYS.answer("entry"), b"{}", ex=600)
    verdicts = VerdictCache(client)
    verifier = Verifier(
        mode="small", providers=build_providers(served), policy=routing_policy(served), verdicts=verdicts
    )
    match = SemanticMatch("entry", 0.93, "hash", FLUSH)
    try:
        assert await verifier.check(PARAPHRASE, None)(match) is None  # a no
        assert await verifier.check(PARAPHRASE.upper(), None)(match) is None  # the same wording, remembered
        assert len(verify_calls(provider)) == 1
        (stored,) = [k async for k in client.scan_iter(KEYS.family("verdict"))]
        assert 0 < await client.pttl(stored) <= 600_000
    finally:
        await client.aclose()


async def test_a_reservation_refused_means_no_hit_not_a_503_and_the_log_says_refused(
    settings: Settings, provider: ProviderServer
) -> None:
    # Review: only `BudgetExceeded` was caught; a busy limits pool (`PoolExhausted`) escaped the
    # optional step as a 503, and a spent budget was logged as `semantic_verify=failed`.
    served = verifying(settings, provider, ["yes"])
    verifier = Verifier(mode="small", providers=build_providers(served), policy=routing_policy(served))
    match = SemanticMatch("entry", 0.93, "hash", FLUSH)
    limits = worker_client(str(settings.redis_url), max_connections=1, wait_s=0.1, name="limits")
    limiter = Limiter(limits)
    spent = TokenBudget(limiter, Principal(uuid.uuid4().hex, "k", ("query",), rpm=None, tokens_per_day=1))
    metered = TokenBudget(limiter, Principal(uuid.uuid4().hex, "k", ("query",), rpm=None, tokens_per_day=10**6))
    try:
        with access_record() as record:
            assert await verifier.check(PARAPHRASE, spent)(match) is None
        assert record["semantic_verify"] == "refused"
        held = await limits.connection_pool.get_connection()  # type: ignore[no-untyped-call]  # its only one
        try:
            with access_record() as record:
                assert await verifier.check(PARAPHRASE, metered)(match) is None  # not `PoolExhausted`
            assert record["semantic_verify"] == "refused"
        finally:
            await limits.connection_pool.release(held)
        assert verify_calls(provider) == []
    finally:
        await limits.aclose()


async def test_a_verification_that_times_out_is_charged_its_prompt(
    settings: Settings, provider: ProviderServer
) -> None:
    # Review: usage arrives only as the stream ends, so a verification cut short by its timeout (or
    # cancelled) settled to 0 tokens, though the provider bills the prompt it was sent.
    served = verifying(settings, provider, [])
    verifier = Verifier(mode="small", providers=build_providers(served), policy=routing_policy(served), timeout_s=0.5)
    match = SemanticMatch("entry", 0.93, "hash", FLUSH)
    limits = worker_client(str(settings.redis_url), max_connections=2, name="limits")
    caller = Principal(uuid.uuid4().hex, "k", ("query",), rpm=None, tokens_per_day=10**6)
    budget = TokenBudget(Limiter(limits), caller)

    async def used() -> int:
        return int(await limits.hget(KEYS.token_budget(caller.key_id), "used") or 0)

    try:
        provider.enqueue(Behavior(status=400))  # refused: billed nothing
        assert await verifier.check(PARAPHRASE, budget)(match) is None
        assert await used() == 0
        provider.enqueue(Behavior(hang=True))  # never answers: its own timeout ends it
        assert await verifier.check(PARAPHRASE, budget)(match) is None
        assert await used() == count_tokens(VERIFY_SYSTEM + verify_prompt(PARAPHRASE, FLUSH))
        assert len(verify_calls(provider)) == 2
    finally:
        await limits.aclose()
