"""Coalesced misses in one app: followers keep their answer when the leader's client hangs up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import httpx
import redis.asyncio as aioredis

from service.answer.coalescing import Coalescer, Coalescing, Lease
from service.answer.events import Clock, Done, Event, Failed, Token
from service.answer.schemas import UsageInfo
from service.embeddings.encoders import LocalEmbedder
from service.http.app import Resources, create_app
from service.http.auth import parse_key
from service.redis.client import WorkerRedis
from service.redis.keyspace import KEYS
from service.settings import Settings
from tests.support.answers import (
    FLUSH,
    SLOW_ANSWER,
    Reply,
    ask,
    followers_joined,
    hang_up_after_first_token,
    running,
    seeded_slow,
)
from tests.support.provider_server import Behavior, ProviderServer
from tests.support.servers import bearer, make_key, serve_app, wait_until
from tests.support.sse import aiter_sse

PDF = "Which library parses PDF files?"


@asynccontextmanager
async def served(
    settings: Settings, local_embedder: LocalEmbedder
) -> AsyncIterator[tuple[httpx.AsyncClient, aioredis.Redis, WorkerRedis]]:
    """The app served to a query key's client, a Redis client, and the worker's Redis pools (to hold)."""
    app = create_app(settings, embedder=local_embedder)
    key = await make_key(settings, "query")
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=60, headers=bearer(key)) as http:
        client = aioredis.from_url(str(settings.redis_url))
        try:
            resources: Resources = app.state.resources
            yield http, client, resources.pools
        finally:
            await client.aclose()


async def test_leader_client_leaving_keeps_the_answer_going_for_followers(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    settings = await seeded_slow(settings, local_embedder, provider)
    async with running(settings, local_embedder) as http:
        client = aioredis.from_url(str(settings.redis_url))
        leader = asyncio.create_task(hang_up_after_first_token(http))
        await provider.async_wait_for(lambda: len(provider.calls) == 1, timeout=10)
        followers = [asyncio.create_task(ask(http)) for _ in range(3)]
        await wait_until(lambda: followers_joined(client, 3), within=10)
        await leader
        replies = await asyncio.gather(*followers)
        assert all(r.meta["cache"] == "coalesced" and r.text == SLOW_ANSWER and r.names[-1] == "done" for r in replies)
        assert len(provider.calls_to("messages")) == 1 and provider.calls_to("messages")[0].completed
        assert (await ask(http)).meta["cache"] == "hit"  # the shared answer was complete, so it was cached
        await client.aclose()


async def test_a_busy_request_pool_does_not_keep_the_leaders_events_from_its_followers(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    # Issue 11: leaders published their events through the request pool, so under a few hundred
    # streams publishing starved the cache, and a busy request pool dropped followers' events.
    settings = (await seeded_slow(settings, local_embedder, provider)).model_copy(update={"redis_max_connections": 2})
    provider.default = Behavior(text=SLOW_ANSWER, first_token_delay=2.0, token_interval=0.05)
    async with served(settings, local_embedder) as (http, client, pools):
        leader = asyncio.create_task(ask(http))
        await provider.async_wait_for(lambda: len(provider.calls) == 1, timeout=10)
        follower = asyncio.create_task(ask(http))
        await wait_until(lambda: followers_joined(client, 1), within=10)
        pool = pools.requests.connection_pool
        # Every request-pool connection held while the whole answer streams (its first token is 2 s away).
        held = [await pool.get_connection() for _ in range(settings.redis_max_connections)]  # type: ignore[no-untyped-call]
        try:
            assert not provider.calls[0].completed  # the answer's events are all still to be published
            reply = await follower
        finally:
            for connection in held:
                await pool.release(connection)
        assert reply.status == 200 and reply.meta["cache"] == "coalesced"
        assert reply.text == SLOW_ANSWER and reply.names[-1] == "done"
        assert (await leader).text == SLOW_ANSWER
        assert len(provider.calls_to("messages")) == 1


async def test_a_busy_publish_pool_delays_the_followers_events_but_loses_none(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    # A batch that found no connection free in time used to be dropped: followers got an answer with holes.
    settings = (await seeded_slow(settings, local_embedder, provider)).model_copy(
        update={"redis_publish_connections": 1}
    )
    provider.default = Behavior(text=SLOW_ANSWER, first_token_delay=0.5, token_interval=0.06)
    async with served(settings, local_embedder) as (http, client, pools):
        pool = pools.publish.connection_pool
        held = await pool.get_connection()  # type: ignore[no-untyped-call]  # its only connection
        try:
            leader = asyncio.create_task(ask(http))
            await provider.async_wait_for(lambda: len(provider.calls) == 1, timeout=10)
            follower = asyncio.create_task(ask(http))
            await wait_until(lambda: followers_joined(client, 1), within=10)
            await provider.async_wait_for(lambda: provider.calls[0].completed, timeout=10)
        finally:
            await pool.release(held)
        reply = await follower
        assert reply.status == 200 and reply.meta["cache"] == "coalesced"
        assert reply.text == SLOW_ANSWER and reply.names[-1] == "done"
        assert (await leader).text == SLOW_ANSWER
        assert (await ask(http)).meta["cache"] == "hit"


# -- in-flight slots: only a generation holds one ----------------------------------------------------


async def capped_key(settings: Settings) -> tuple[str, str]:
    """A query key allowed one answer in flight, and the Redis key of its in-flight slots."""
    key = await make_key(settings, "query", max_inflight=1)
    parsed = parse_key(key)
    assert parsed is not None
    return key, KEYS.inflight_slots(parsed[0])


def slots_free(client: aioredis.Redis, slots: str) -> Callable[[], Awaitable[bool]]:
    """A `wait_until` predicate: every slot of the key given back (none leaks)."""

    async def free() -> bool:
        return int(await client.zcard(slots)) == 0

    return free


async def test_followers_take_no_in_flight_slot_and_the_cap_still_holds(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    # Issue 11: a follower took one of its key's in-flight slots though it costs no generation, so
    # identical questions beyond `max_inflight` got 429 `too_many_inflight`.
    settings = await seeded_slow(settings, local_embedder, provider)
    provider.default = Behavior(text=SLOW_ANSWER, first_token_delay=3.0, token_interval=0.05)
    key, slots = await capped_key(settings)
    async with running(settings, local_embedder, key=key) as http:
        client = aioredis.from_url(str(settings.redis_url))
        leader = asyncio.create_task(ask(http))
        await provider.async_wait_for(lambda: len(provider.calls) == 1, timeout=10)
        followers = [asyncio.create_task(ask(http)) for _ in range(4)]
        await wait_until(lambda: followers_joined(client, 4), within=20)
        over = await ask(http, PDF)  # a distinct question would generate: beyond the cap
        assert over.status == 429 and over.body["error"]["code"] == "too_many_inflight"
        assert not provider.calls[0].completed  # the leader still held its slot meanwhile
        replies = await asyncio.gather(leader, *followers)
        assert [r.status for r in replies] == [200] * 5
        assert all(r.text == SLOW_ANSWER and r.names[-1] == "done" for r in replies)
        assert sorted(r.meta["cache"] for r in replies) == ["coalesced"] * 4 + ["miss"]
        assert len(provider.calls_to("messages")) == 1
        await wait_until(slots_free(client, slots), within=10)  # released as the generation ended
        provider.default = Behavior()
        assert (await ask(http, PDF)).status == 200
        await client.aclose()


async def test_a_generation_gives_its_slot_back_however_it_ends(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    # The slot is now held by the generation (its producer), not by the request: a leader whose client
    # hangs up with nobody following is cancelled, and one followed goes on; both give it back.
    settings = await seeded_slow(settings, local_embedder, provider)
    key, slots = await capped_key(settings)
    async with running(settings, local_embedder, key=key) as http:
        client = aioredis.from_url(str(settings.redis_url))
        await hang_up_after_first_token(http)  # alone: cancelled
        await wait_until(slots_free(client, slots), within=10)
        leader = asyncio.create_task(hang_up_after_first_token(http, PDF))  # followed: goes on without its client
        await provider.async_wait_for(lambda: len(provider.calls) == 2, timeout=10)
        follower = asyncio.create_task(ask(http, PDF))
        await wait_until(lambda: followers_joined(client, 1), within=10)
        await leader
        assert (await follower).text == SLOW_ANSWER
        await wait_until(slots_free(client, slots), within=10)
        assert len(provider.calls_to("messages")) == 2
        await client.aclose()


async def test_a_follower_that_takes_over_needs_a_slot_of_its_own(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    # The leader's lease lapses before its first event (its renewals cannot get a connection of
    # the publish pool, held here), so its follower takes the generation over: that one now
    # generates, so it needs a slot of its key's, and its key has none free: 429, nothing leaked.
    settings = (await seeded_slow(settings, local_embedder, provider)).model_copy(
        update={"redis_publish_connections": 1, "coalesce_lease_ms": 3000}
    )
    provider.default = Behavior(text=SLOW_ANSWER, first_token_delay=6.0, token_interval=0.02)
    capped, slots = await capped_key(settings)
    async with served(settings, local_embedder) as (http, client, pools):
        pool = pools.publish.connection_pool
        held = await pool.get_connection()  # type: ignore[no-untyped-call]  # its only connection
        try:
            busy = asyncio.create_task(ask(http, PDF, headers=bearer(capped)))  # the capped key's one slot
            await provider.async_wait_for(lambda: len(provider.calls) == 1, timeout=10)
            leader = asyncio.create_task(ask(http))
            await provider.async_wait_for(lambda: len(provider.calls) == 2, timeout=10)
            follower = asyncio.create_task(ask(http, headers=bearer(capped)))
            await wait_until(lambda: followers_joined(client, 1), within=10)
            taken_over = await follower
            assert taken_over.status == 429 and taken_over.body["error"]["code"] == "too_many_inflight"
            assert len(provider.calls) == 2  # refused before any work
        finally:
            await pool.release(held)
        assert (await leader).text == SLOW_ANSWER and (await busy).status == 200
        await wait_until(slots_free(client, slots), within=10)


# -- leaders publish only while someone follows --------------------------------------------------


async def test_a_leader_nobody_follows_writes_no_stream(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    # Issue 11: every leader wrote each batch of its tokens to a Redis stream for followers that
    # mostly did not exist; under a burst of distinct misses that alone kept the publish pool busy.
    settings = await seeded_slow(settings, local_embedder, provider)
    async with running(settings, local_embedder) as http:
        reply = await ask(http)
        assert reply.meta["cache"] == "miss" and reply.text == SLOW_ANSWER and reply.names[-1] == "done"
    async with aioredis.from_url(str(settings.redis_url)) as client:  # a written stream would be kept
        assert [k async for k in client.scan_iter(match=KEYS.family("stream"))] == []  # (STREAM_RETENTION_S)


async def test_a_follower_joining_mid_answer_gets_all_of_it(
    settings: Settings, local_embedder: LocalEmbedder, provider: ProviderServer
) -> None:
    settings = await seeded_slow(settings, local_embedder, provider)
    provider.default = Behavior(text=SLOW_ANSWER, first_token_delay=0.5, token_interval=0.15)
    async with running(settings, local_embedder) as http:
        client = aioredis.from_url(str(settings.redis_url))
        leader: list[str] = []
        follower: asyncio.Task[Reply] | None = None
        async with http.stream("POST", "/rag/stream", json={"question": FLUSH}) as response:
            async for name, data in aiter_sse(response.aiter_lines()):
                if name == "token":
                    leader.append(data["text"])
                if len(leader) == 5 and follower is None:  # tokens the leader kept to itself so far
                    follower = asyncio.create_task(ask(http))
                    await wait_until(lambda: followers_joined(client, 1), within=10)
        assert follower is not None and "".join(leader) == SLOW_ANSWER
        reply = await follower
        assert reply.meta["cache"] == "coalesced" and reply.text == SLOW_ANSWER and reply.names[-1] == "done"
        assert len(provider.calls_to("messages")) == 1
        await client.aclose()


async def test_a_follower_that_joins_after_the_last_event_still_gets_every_one(settings: Settings) -> None:
    # The leader's last look found nobody; the follower joined before the lease was released: the
    # release itself must notice it and write the whole answer first.
    client, coalescer, key = coalescing_on(settings)
    lease = await leading(coalescer, key)
    events: list[Event] = [Token("a"), Token(" b"), Failed("generation_failed", "stopped")]
    for event in events:
        lease.publish(event)
    await lease.drained()
    assert not await client.exists(coalescer.stream_key(key))  # nobody followed: nothing written

    follower = following(coalescer, key)
    await wait_until(lambda: followers_joined(client, 1), within=10)
    await lease.close()
    assert await follower == events
    await client.aclose()


# -- a follower follows one generation only ------------------------------------------------------


def _done() -> Done:
    return Done(UsageInfo(input_tokens=1, output_tokens=2, cost_usd=0.0), 1.0, 1.0, cached=False)


async def _nothing_free() -> list[Event] | None:
    return None


async def _never(look_again: bool) -> AsyncIterator[Event]:
    raise AssertionError("a follower must not generate here")
    yield Token("")  # pragma: no cover


def coalescing_on(settings: Settings, lease_ms: int = 5000) -> tuple[aioredis.Redis, Coalescer, str]:
    """A Redis client, a coalescer on it, and a key nobody has asked for."""
    client = aioredis.from_url(str(settings.redis_url))
    return client, Coalescer(client, lease_ms=lease_ms), uuid.uuid4().hex


async def leading(coalescer: Coalescer, key: str) -> Lease:
    """The lease of `key`'s generation: the key must be free."""
    lease = await coalescer.lead(key)
    assert lease is not None
    return lease


def following(coalescer: Coalescer, key: str) -> asyncio.Task[list[Event]]:
    """A follower of `key`'s generation, collecting every event it relays."""

    async def follow() -> list[Event]:
        return [event async for event in coalescer.follow(key)]

    return asyncio.create_task(follow())


def relaying(coalescing: Coalescing, key: str, seen: list[Event]) -> asyncio.Task[None]:
    """A request for `key` that must follow (it may not generate), its events appended to `seen`."""

    async def relay() -> None:
        async for event in coalescing.run(key, _never, free=_nothing_free, request_id="g", clock=Clock()):
            seen.append(event)

    return asyncio.create_task(relay())


async def _lapsed_leader(client: aioredis.Redis, coalescer: Coalescer, key: str) -> Lease:
    """A leader whose worker died: no more renewals, no release (its lease lapses when the test says)."""
    lease = await coalescer.lead(key)
    assert lease is not None and lease._renewer is not None
    lease._renewer.cancel()
    return lease


async def test_a_follower_that_showed_text_is_told_its_leader_was_lost_not_given_the_next_generation(
    settings: Settings,
) -> None:
    # Review: A's lease lapsed, B led the key (restarting its stream), and A's follower, still
    # counted in, read B's answer after A's partial one: "A1A2" + B's whole answer + done.
    client, coalescer, key = coalescing_on(settings)
    coalescing = Coalescing(coalescer, available=lambda: True, detach=lambda coro: coro.close())
    a = await _lapsed_leader(client, coalescer, key)
    seen: list[Event] = []

    follower = relaying(coalescing, key, seen)
    await wait_until(lambda: followers_joined(client, 1), within=10)
    a.publish(Token("A1"))
    a.publish(Token("A2"))
    await wait_until(lambda: len(seen) == 2, within=10)
    await client.delete(coalescer.lease_key(key))  # A's lease lapses
    b = await leading(coalescer, key)
    for event in (Token("B1"), Token("B2"), _done()):
        b.publish(event)
    await b.close()
    await asyncio.wait_for(follower, 10)
    assert seen == [Token("A1"), Token("A2"), Failed("leader_lost", seen[-1].message)]  # type: ignore[union-attr]
    await client.aclose()


async def test_a_follower_that_showed_nothing_follows_the_next_generation_instead(settings: Settings) -> None:
    client, coalescer, key = coalescing_on(settings)
    coalescing = Coalescing(coalescer, available=lambda: True, detach=lambda coro: coro.close())
    await _lapsed_leader(client, coalescer, key)
    seen: list[Event] = []

    follower = relaying(coalescing, key, seen)
    await wait_until(lambda: followers_joined(client, 1), within=10)
    await client.delete(coalescer.lease_key(key))  # A lapses before its first event
    b = await leading(coalescer, key)
    b.publish(Token("B1"))
    await wait_until(lambda: len(seen) == 1, within=10)  # it follows B now (B keeps its lease meanwhile)
    b.publish(Token("B2"))
    b.publish(_done())
    await b.close()
    await asyncio.wait_for(follower, 10)
    assert seen[:2] == [Token("B1"), Token("B2")] and isinstance(seen[2], Done) and len(seen) == 3
    await client.aclose()


async def test_a_follower_leaving_a_lapsed_count_does_not_hide_the_next_generations_follower(
    settings: Settings,
) -> None:
    # Review: the count's TTL was set at join only; an answer outliving it made the follower's DECR
    # recreate it at -1 with no TTL, and the next leader of the key then saw nobody following.
    client, coalescer, key = coalescing_on(settings)
    count = coalescer.followers_key(key)
    a = await leading(coalescer, key)

    first = following(coalescer, key)
    await wait_until(lambda: followers_joined(client, 1), within=10)
    a.publish(Token("x"))
    await wait_until(lambda: client.exists(coalescer.stream_key(key)), within=10)  # A saw its follower
    await client.delete(count)  # what its TTL does to a long answer
    a.publish(_done())
    await a.close()
    assert len(await first) == 2
    assert not await client.exists(count)

    b = await leading(coalescer, key)
    second = following(coalescer, key)
    await wait_until(lambda: followers_joined(client, 1), within=10)
    assert await b.abandon() is False  # someone follows: the answer goes on
    b.publish(_done())
    await b.close()
    assert len(await second) == 1
    assert not await client.exists(count)  # the last one out leaves no count behind
    await client.aclose()


async def test_the_leaders_renewals_keep_its_follower_count_alive(settings: Settings) -> None:
    client, coalescer, key = coalescing_on(settings, lease_ms=300)
    count = coalescer.followers_key(key)
    lease = await leading(coalescer, key)

    follower = following(coalescer, key)
    await wait_until(lambda: followers_joined(client, 1), within=10)
    await client.expire(count, 5)  # about to lapse, as after most of a long answer

    async def renewed() -> bool:
        return int(await client.ttl(count)) > 5

    await wait_until(renewed, within=10)
    lease.publish(_done())
    await lease.close()
    assert len(await follower) == 1
    await client.aclose()


async def test_a_lapsed_leaders_release_leaves_its_successors_live_stream_alone(settings: Settings) -> None:
    # Review: the release set the stream's retention TTL before checking it still held the lease,
    # so a stale leader's release put a 60 s TTL on the next generation's live stream.
    client, coalescer, key = coalescing_on(settings)
    stream = coalescer.stream_key(key)
    a = await _lapsed_leader(client, coalescer, key)
    await client.delete(coalescer.lease_key(key))  # A's lease lapses
    b = await leading(coalescer, key)

    follower = following(coalescer, key)
    await wait_until(lambda: followers_joined(client, 1), within=10)
    b.publish(Token("B1"))
    await wait_until(lambda: client.exists(stream), within=10)
    await a.close()  # A comes back and lets go of what it thinks is its lease
    assert int(await client.ttl(stream)) == -1  # B's stream: live, no retention TTL yet
    b.publish(_done())
    await b.close()
    assert len(await follower) == 2
    assert int(await client.ttl(stream)) > 0  # B's own release sets it
    await client.aclose()


async def test_a_followed_leader_keeps_only_what_it_has_not_written_yet(settings: Settings) -> None:
    # Review: a leader kept every event of its answer in memory, even once written for its followers.
    client, coalescer, key = coalescing_on(settings)
    lease = await leading(coalescer, key)
    before: list[Event] = [Token("a"), Token(" b")]
    for event in before:
        lease.publish(event)
    await lease.drained()
    assert lease._events == before  # nobody follows yet: kept for a follower that may still come

    follower = following(coalescer, key)
    await wait_until(lambda: followers_joined(client, 1), within=10)
    after: list[Event] = [Token(f" {i}") for i in range(50)]
    for event in after:
        lease.publish(event)
    await lease.drained()
    assert lease._events == []  # all in the stream: nothing kept
    lease.publish(_done())
    await lease.close()
    assert await follower == [*before, *after, _done()]
    await client.aclose()


async def test_a_follower_cancelled_with_its_clients_scope_still_leaves_the_count(settings: Settings) -> None:
    # Review: a client that hangs up is cancelled through an anyio cancel scope (sse-starlette), which
    # also cancelled the follower's unshielded leave: it stayed counted, renewals kept the count alive,
    # and a leader whose own client then left went on generating for nobody.
    client, coalescer, key = coalescing_on(settings)
    lease = await leading(coalescer, key)

    async def follow() -> None:
        async for _ in coalescer.follow(key):
            pass

    async with anyio.create_task_group() as group:
        group.start_soon(follow)
        await wait_until(lambda: followers_joined(client, 1), within=10)
        group.cancel_scope.cancel()

    async def nobody_follows() -> bool:
        return not await client.exists(coalescer.followers_key(key))

    await wait_until(nobody_follows, within=10)
    assert await lease.abandon() is True  # nobody follows: the answer may stop
    await client.aclose()
