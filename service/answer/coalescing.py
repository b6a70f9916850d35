"""Coalesced misses: N identical in-flight questions cost one generation.

The first request for a key takes a lease (`SET NX PX`) and becomes the leader. Requests that
find the lease taken count themselves in (`followers:`) and follow the leader's Redis Stream live
(`XREAD BLOCK`, on a pool of their own so that waiting never holds the request pool's connections),
from any worker process. The leader writes that stream only while someone follows: it keeps its
events in memory, looks at the follower count before each batch, and on seeing a follower writes
every event from the first one on; its release of the lease takes one last look atomically, so a
follower that counted itself in after the leader's last look is never left with holes. The leader
renews its lease while generating; if it dies, the lease expires and a follower that has
not yet shown anything takes over, while one that has gets a clean error event.
Redis being down turns coalescing off (every request answers on its own).

`Lease` and `Coalescer` speak Redis (scripts, streams); `Coalescing.run(key, produce)` is
the choreography the pipeline calls: lead, follow or take over, with the leader's answer
produced in a task of its own so that it can outlive its client for its followers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.answer.events import Clock, Done, Event, Failed, Meta, Token, decode, encode
from service.answer.schemas import UsageInfo
from service.errors import LeaderFailed, Overloaded, PoolExhausted, ServiceError
from service.redis.keyspace import BEST_EFFORT_ERRORS, KEYS, REDIS_ERRORS, Keyspace

log = logging.getLogger(__name__)

STREAM_RETENTION_S = 60  # late followers can still replay a finished answer
PUBLISH_ATTEMPTS = 5  # round trips a batch may find the publish pool busy (each waits for a connection)
CANCELLED = "cancelled"  # a stream's end marker from leaders before issue 11 (their client left)

# Each script is atomic in Redis, which is what makes joining and abandoning race-free.
# A new generation: take the lease and drop a finished one's stream, at once (no follower reads it).
_LEAD = """
if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('del', KEYS[2])
return 1"""
# Let go of the lease, unless followers came while nothing was written (ARGV[2] '0'): then return 0,
# and the leader writes every event before trying again. Atomic with `_JOIN`: no follower slips between.
# A leader whose lease lapsed leaves the stream alone if another leads now (it is that one's, live).
_RELEASE = """
local owner = redis.call('get', KEYS[1])
if owner and owner ~= ARGV[1] then return 1 end
redis.call('expire', KEYS[3], ARGV[3])
if not owner then return 1 end
if ARGV[2] == '0' and tonumber(redis.call('get', KEYS[2]) or '0') > 0 then return 0 end
redis.call('del', KEYS[1])
return 1"""
# Keep the lease, and the follower count with it (an answer may outlast the count's TTL set at
# join); returns how many follow (a follower that joined during a pause in the answer).
_RENEW = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('pexpire', KEYS[1], ARGV[2])
redis.call('expire', KEYS[2], ARGV[3])
return tonumber(redis.call('get', KEYS[2]) or '0')"""
# Only the current leader may write to the stream (a cancelled one may still hold a token in flight).
# ARGV[2..]: (event, data) pairs, in order: one call carries every event queued meanwhile. Each entry
# names its generation (`g`, the lease token): a follower of a lapsed leader must not read a successor's.
_PUBLISH = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('xadd', KEYS[2], '*', 'g', ARGV[1], 'e', ARGV[i], 'd', ARGV[i + 1]) end
return 1"""
# The leader's client left: give up only if nobody follows, and then at once (a follower that
# comes later finds no lease and looks again).
_ABANDON = """
if tonumber(redis.call('get', KEYS[1]) or '0') > 0 then return 0 end
if redis.call('get', KEYS[2]) == ARGV[1] then redis.call('del', KEYS[2]) end
return 1"""
# A follower counts itself in and learns which generation it follows (the lease token), if any.
_JOIN = """
redis.call('incr', KEYS[1])
redis.call('expire', KEYS[1], ARGV[1])
return redis.call('get', KEYS[2])"""
# A follower leaves: never recreate a lapsed count (a -1 without TTL would hide the next follower of
# the key from its leader), and never leave one at 0 or below.
_LEAVE = """
if redis.call('exists', KEYS[1]) == 0 then return 0 end
local n = redis.call('decr', KEYS[1])
if n <= 0 then redis.call('del', KEYS[1]) end
return n"""


class LeaderLostError(Exception):
    """The leader vanished (crash, lease expiry or cancellation) before finishing the answer."""


@dataclass
class Lease:
    """Leadership of one key; publishes events while someone follows, and keeps the lease alive until closed."""

    coalescer: Coalescer
    key: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _renewer: asyncio.Task[None] | None = None
    # The events not in the stream yet, in order: every one until someone follows (a follower needs
    # the answer from its first event), then only those still to write (memory bounded by the backlog).
    _events: list[Event] = field(default_factory=list)
    _followed: bool = False  # someone follows: every event goes to the stream, from the first on
    _flusher: asyncio.Task[None] | None = None
    _broken: bool = False  # a batch could not be published: followers must not get the rest

    def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew(), name=f"lease-{self.key[:8]}")

    async def _renew(self) -> None:
        c = self.coalescer
        while True:
            await asyncio.sleep(c.lease_ms / 3000)
            with contextlib.suppress(*BEST_EFFORT_ERRORS):
                keys = (c.lease_key(self.key), c.followers_key(self.key))
                ttl = STREAM_RETENTION_S + c.lease_ms // 1000  # the count outlives every renewal's interval
                renewed = await c.renew_lease(keys=keys, args=[self.token, c.lease_ms, ttl])
                if int(renewed) > 0 and not self._followed:
                    self._followed = True  # joined while the answer paused: it need not wait for the next event
                    self._kick()

    def publish(self, event: Event) -> None:
        """Keep an event for the followers; once someone follows, one round trip writes all that queued meanwhile.

        Every leader wrote every batch of its events to Redis, and under a few hundred concurrent
        streams (bench/load.py) that kept the publish pool busy, though nearly none had a follower;
        now a leader only looks at its follower count (a GET) until it has one. The writes go
        through a pool of their own (`Coalescer.publisher`), where a busy pool makes batches
        larger rather than starving cache reads and writes.
        """
        if self._broken:
            return
        self._events.append(event)
        self._kick()

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"publish-{self.key[:8]}")

    async def _flush(self) -> None:
        c = self.coalescer
        busy = 0
        while not self._broken and self._events:
            if not self._followed:
                try:
                    self._followed = int(await c.publisher.get(c.followers_key(self.key)) or 0) > 0
                except BEST_EFFORT_ERRORS:
                    return  # cannot tell now: nothing is lost, the next event (or `close`) looks again
                if not self._followed:
                    return  # nobody follows: the events stay here, for a follower that may still come
            batch = self._events[:]
            args = [self.token]
            for event in batch:
                fields = encode(event)
                args += [fields["e"], fields["d"]]
            try:
                await c.publish_events(keys=[c.lease_key(self.key), c.stream_key(self.key)], args=args)
                del self._events[: len(batch)]  # in the stream now: followers read them there
                busy = 0
            except PoolExhausted as exc:
                # No connection came free in time: the batch stays unwritten (and grows with what
                # queues meanwhile) for the next round trip, so followers get every event, only later.
                busy += 1
                if busy < PUBLISH_ATTEMPTS:
                    continue
                log.warning("cannot publish to followers: %s", type(exc).__name__)
                self._stop_publishing()
            except BEST_EFFORT_ERRORS as exc:
                log.warning("cannot publish to followers: %s", type(exc).__name__)
                self._stop_publishing()

    def _stop_publishing(self) -> None:
        """A lost batch would leave a hole in followers' answers: publish nothing more instead.

        Followers then see the stream end without `done` once the lease is released, and get a
        clean `leader_lost` error event (or take over if they had shown nothing).
        """
        self._events = []
        self._broken = True

    async def drained(self) -> None:
        """Until every event so far is in the stream, or was kept back because nobody followed."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)

    async def abandon(self) -> bool:
        """Give the answer up because our client left; False if others follow it (keep going)."""
        c = self.coalescer
        keys = (c.followers_key(self.key), c.lease_key(self.key))
        try:
            alone = await c.abandon_lease(keys=keys, args=[self.token])
        except BEST_EFFORT_ERRORS:
            return True  # cannot tell: stop paying for an answer nobody may read
        return bool(alone)

    async def close(self) -> None:
        """Publish what followers need, then release the lease (followers see every event first).

        The release looks at the follower count once more, in one script with it: a follower that
        counted itself in after the last look makes the leader write every event, then release.
        """
        if self._renewer is not None:
            self._renewer.cancel()
        await self.drained()
        c = self.coalescer
        keys = (c.lease_key(self.key), c.followers_key(self.key), c.stream_key(self.key))
        for _ in range(2):  # the second time, everything was written (or could not be)
            written = "1" if self._followed or self._broken else "0"
            try:
                if await c.release_lease(keys=keys, args=[self.token, written, STREAM_RETENTION_S]):
                    return
            except BEST_EFFORT_ERRORS:
                return  # the lease lapses on its own; its followers then take over or hear `leader_lost`
            self._followed = True
            self._kick()
            await self.drained()


class Coalescer:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        followers: aioredis.Redis | None = None,
        publisher: aioredis.Redis | None = None,
        lease_ms: int = 5000,
        keys: Keyspace = KEYS,
    ) -> None:
        self.client = client
        # Followers block in XREAD for up to `block_ms` at a time: on a pool apart from the requests'.
        self.followers = followers if followers is not None else client
        # A leader's writes once it leads (events, lease renewals, release): one round trip per
        # batch of tokens per stream, on a pool apart from the requests' so it never starves the cache.
        self.publisher = publisher if publisher is not None else client
        self.lease_ms = lease_ms
        self.keys = keys
        self.publish_events = self.publisher.register_script(_PUBLISH)  # EVALSHA: the script is sent once
        self.take_lease = self.client.register_script(_LEAD)
        self.leave = self.followers.register_script(_LEAVE)
        self.join = self.followers.register_script(_JOIN)
        self.renew_lease = self.publisher.register_script(_RENEW)
        self.abandon_lease = self.publisher.register_script(_ABANDON)
        self.release_lease = self.publisher.register_script(_RELEASE)

    def lease_key(self, key: str) -> str:
        return self.keys.lease(key)

    def stream_key(self, key: str) -> str:
        return self.keys.stream(key)

    def followers_key(self, key: str) -> str:
        return self.keys.followers(key)

    async def lead(self, key: str) -> Lease | None:
        """The lease if this request leads; None if another request is already generating.

        Raises RedisError/OSError when Redis is unreachable (the caller then goes solo), and
        `PoolExhausted` when this worker's pool is busy (a 503: going solo would cost a generation).
        """
        lease = Lease(self, key)
        keys = [self.lease_key(key), self.stream_key(key)]
        if not await self.take_lease(keys=keys, args=[lease.token, self.lease_ms]):
            return None
        lease.start()
        return lease

    async def follow(self, key: str, *, block_ms: int = 500) -> AsyncIterator[Event]:
        """The leader's events from the first one on, live; raises LeaderLostError if it dies.

        Only the generation joined is followed: if its lease lapses and another request leads the
        key meanwhile (which restarts the stream), that one's entries (another `g`) end this follow
        as a lost leader, never spliced after what was already shown.
        """
        stream, lease = self.stream_key(key), self.lease_key(key)
        client = self.followers
        generation = await self.join(keys=[self.followers_key(key), lease], args=[STREAM_RETENTION_S])
        if not generation:
            await asyncio.shield(self.leave(keys=[self.followers_key(key)]))
            raise LeaderLostError(key)  # finished or abandoned just now: look again
        last = "0-0"
        quiet_since = time.monotonic()
        try:
            while True:
                batch: Any = await client.xread({stream: last}, count=256, block=block_ms)
                if batch:  # RESP2 reply: [[stream, [(id, fields), ...]]]
                    quiet_since = time.monotonic()
                    for entry_id, fields in batch[0][1]:
                        last = entry_id
                        if fields.get(b"g", generation) != generation:
                            raise LeaderLostError(key)  # a successor's generation: ours lapsed
                        event = decode(fields)
                        if isinstance(event, Failed) and event.code == CANCELLED:
                            raise LeaderLostError(key)
                        yield event
                        if isinstance(event, Done | Failed):
                            return
                elif await client.get(lease) != generation and time.monotonic() - quiet_since > block_ms / 1000:
                    raise LeaderLostError(key)
        finally:
            with contextlib.suppress(*BEST_EFFORT_ERRORS):
                await asyncio.shield(self.leave(keys=[self.followers_key(key)]))


# -- the choreography ------------------------------------------------------------------------

TAKEOVER_ATTEMPTS = 3
Produce = Callable[[bool], AsyncIterator[Event]]  # the answer, told whether to look in the exact cache again
Free = Callable[[], Awaitable[list[Event] | None]]  # an answer that costs nothing now (a cache hit), or None


# Refusals that concern the leader's request alone, not the answer: its key's token budget or
# in-flight cap (a follower holds no slot: taking over, it takes one of its own key's), or its turn
# in the admission queue (fair by key: a follower queues under its own key instead).
_LEADERS_OWN = frozenset({"token_budget_exceeded", "overloaded", "too_many_inflight"})


class _TakeOverError(Exception):
    """A followed leader vanished before its first event; this request may lead instead."""


class Coalescing:
    """One request's part in a coalesced answer: lead it, follow it, or take it over."""

    def __init__(
        self,
        coalescer: Coalescer,
        *,
        available: Callable[[], bool],
        detach: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.coalescer = coalescer
        self.available = available  # False while Redis is known to be down: answer alone
        self.detach = detach

    async def run(
        self, key: str | None, produce: Produce, *, free: Free, request_id: str, clock: Clock
    ) -> AsyncIterator[Event]:
        """The answer for `key` (None: answer alone), generated once for every request asking for it.

        Each attempt first asks `free()` for an answer that costs nothing (the leader just
        before us may have cached one). Then this request leads, and `produce(True)` answers
        for it and its followers; or it follows the leader live, and takes over if that one
        dies before its first event. Without Redis it answers alone with `produce(False)`.
        """
        for _ in range(TAKEOVER_ATTEMPTS):
            answered = await free()
            if answered is not None:
                for event in answered:
                    yield event
                return
            role = await self._lead_or_follow(key)
            if role == "follow":
                assert key is not None  # only a shared answer is followed
                try:
                    async for event in self._follow(key, request_id, clock):
                        yield event
                    return
                except _TakeOverError:
                    continue  # the leader died before showing anything: try to lead ourselves
            async for event in self._produce_and_consume(produce(role is not None), role):
                yield event
            return
        raise Overloaded("coalescing_failed", "could not join or start a generation", retry_after=1)

    async def _lead_or_follow(self, key: str | None) -> Lease | Literal["follow"] | None:
        if key is None or not self.available():
            return None
        try:
            lease = await self.coalescer.lead(key)
        except REDIS_ERRORS:
            return None  # no Redis, no coalescing: answer on our own
        return "follow" if lease is None else lease

    async def _produce_and_consume(self, events: AsyncIterator[Event], lease: Lease | None) -> AsyncIterator[Event]:
        """Produce in a task of its own, so the answer can outlive this request for its followers."""
        queue: asyncio.Queue[Event | Exception | None] = asyncio.Queue()
        producer = asyncio.create_task(self._produce(events, lease, queue))
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            if not producer.done():
                # Our client left. Nothing may be awaited here (the response's cancel scope would
                # cancel it again), so the decision runs in a task of its own.
                if lease is None:
                    producer.cancel()  # closes the provider connection at once
                else:
                    self.detach(self._abandon_unless_followed(lease, producer))

    async def _produce(
        self, events: AsyncIterator[Event], lease: Lease | None, queue: asyncio.Queue[Event | Exception | None]
    ) -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
                if lease is not None:
                    lease.publish(event)
        except Exception as exc:  # the consumer raises it; followers hear a domain error's reason
            queue.put_nowait(exc)
            if lease is not None and isinstance(exc, ServiceError):
                lease.publish(Failed(exc.code, exc.message))
        finally:
            queue.put_nowait(None)
            if lease is not None:
                await lease.close()

    async def _abandon_unless_followed(self, lease: Lease, producer: asyncio.Task[None]) -> None:
        """Keep producing only if other requests follow this answer; otherwise cancel it."""
        if await lease.abandon():
            producer.cancel()

    async def _follow(self, key: str, request_id: str, clock: Clock) -> AsyncIterator[Event]:
        """Relay another request's generation of the same answer, live, as this request's events."""
        shown = False
        try:
            async for event in self.coalescer.follow(key):
                if isinstance(event, Failed) and not shown:
                    if event.code in _LEADERS_OWN:
                        raise _TakeOverError  # the leader's key was refused, not the answer: try ourselves
                    raise LeaderFailed(event.code, event.message)
                if isinstance(event, Meta):
                    event = replace(event, request_id=request_id, cache="coalesced")
                elif isinstance(event, Token):
                    clock.token()
                elif isinstance(event, Done):  # free for us; `saved` is what the leader's answer cost
                    free = UsageInfo(input_tokens=0, output_tokens=0, cost_usd=0.0)
                    saved = event.saved if event.saved is not None else event.usage
                    event = Done(free, clock.ms(), clock.ttft_ms(), cached=False, saved=saved)
                shown = True
                yield event
        except PoolExhausted as exc:  # back-pressure, not a lost leader: 503 before the stream, else an error event
            if not shown:
                raise
            yield Failed(exc.code, exc.message)
        except (LeaderLostError, RedisError, OSError) as exc:
            if not shown:
                raise _TakeOverError from exc
            yield Failed("leader_lost", "the shared generation of this answer stopped; please retry")
