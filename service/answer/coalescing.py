"""Coalesced misses: N identical in-flight questions cost one generation.

The first request for a key takes a lease (`SET NX PX`) and becomes the leader; it
publishes every event of its answer to a Redis Stream. Requests that find the lease
taken follow the stream live (`XREAD BLOCK`), from any worker process. The leader
renews its lease while generating; if it dies, the lease expires and a follower that has
not yet shown anything takes over, while one that has gets a clean error event.
Redis being down turns coalescing off (every request answers on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.answer.events import Done, Event, Failed, decode, encode
from service.redis.keyspace import KEYS, Keyspace

log = logging.getLogger(__name__)

STREAM_RETENTION_S = 60  # late followers can still replay a finished answer
CANCELLED = "cancelled"  # the leader's client left and nobody was following

# Each script is atomic in Redis, which is what makes joining and abandoning race-free.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0"""
# Only the current leader may write to the stream (a cancelled one may still hold a token in flight).
# ARGV[2..]: (event, data) pairs, in order: one call carries every event queued meanwhile.
_PUBLISH = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('xadd', KEYS[2], '*', 'e', ARGV[i], 'd', ARGV[i + 1]) end
return 1"""
# The leader's client left: give up only if nobody follows, and then at once.
_ABANDON = """
if tonumber(redis.call('get', KEYS[1]) or '0') > 0 then return 0 end
if redis.call('get', KEYS[2]) == ARGV[1] then
  redis.call('xadd', KEYS[3], '*', 'e', ARGV[2], 'd', ARGV[3])
  redis.call('expire', KEYS[3], ARGV[4])
  redis.call('del', KEYS[2])
end
return 1"""
# A follower counts itself in and learns whether there is still a leader to follow.
_JOIN = """
redis.call('incr', KEYS[1])
redis.call('expire', KEYS[1], ARGV[1])
return redis.call('exists', KEYS[2])"""


class LeaderLostError(Exception):
    """The leader vanished (crash, lease expiry or cancellation) before finishing the answer."""


@dataclass
class Lease:
    """Leadership of one key; publishes events and keeps the lease alive until closed."""

    coalescer: Coalescer
    key: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _renewer: asyncio.Task[None] | None = None
    _pending: list[Event] = field(default_factory=list)
    _flusher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew(), name=f"lease-{self.key[:8]}")

    async def _renew(self) -> None:
        c = self.coalescer
        while True:
            await asyncio.sleep(c.lease_ms / 3000)
            with contextlib.suppress(RedisError, OSError):
                await c.client.eval(_RENEW, 1, c.lease_key(self.key), self.token, c.lease_ms)

    def publish(self, event: Event) -> None:
        """Queue an event for the followers; one round trip carries all that queued meanwhile.

        A Redis call per token per stream exhausted the connection pool under a few hundred
        concurrent streams (bench/load.py), which then switched the cache off.
        """
        self._pending.append(event)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"publish-{self.key[:8]}")

    async def _flush(self) -> None:
        c = self.coalescer
        while self._pending:
            batch, self._pending = self._pending, []
            args = [self.token]
            for event in batch:
                fields = encode(event)
                args += [fields["e"], fields["d"]]
            try:
                await c.publish_events(keys=[c.lease_key(self.key), c.stream_key(self.key)], args=args)
            except (RedisError, OSError) as exc:
                log.warning("cannot publish to followers: %s", type(exc).__name__)

    async def abandon(self) -> bool:
        """Give the answer up because our client left; False if others follow it (keep going)."""
        c = self.coalescer
        fields = encode(Failed(CANCELLED, "the generation of this answer was cancelled"))
        keys = (c.followers_key(self.key), c.lease_key(self.key), c.stream_key(self.key))
        try:
            alone = await c.client.eval(_ABANDON, 3, *keys, self.token, fields["e"], fields["d"], STREAM_RETENTION_S)
        except (RedisError, OSError):
            return True  # cannot tell: stop paying for an answer nobody may read
        return bool(alone)

    async def close(self) -> None:
        """Publish what is queued, then release the lease (followers see every event first)."""
        if self._renewer is not None:
            self._renewer.cancel()
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        c = self.coalescer
        with contextlib.suppress(RedisError, OSError):
            async with c.client.pipeline(transaction=False) as pipe:
                pipe.expire(c.stream_key(self.key), STREAM_RETENTION_S)
                pipe.eval(_RELEASE, 1, c.lease_key(self.key), self.token)
                await pipe.execute()


class Coalescer:
    def __init__(self, client: aioredis.Redis, *, lease_ms: int = 5000, keys: Keyspace = KEYS) -> None:
        self.client = client
        self.lease_ms = lease_ms
        self.keys = keys
        self.publish_events = client.register_script(_PUBLISH)  # EVALSHA: the script is sent once

    def lease_key(self, key: str) -> str:
        return self.keys.lease(key)

    def stream_key(self, key: str) -> str:
        return self.keys.stream(key)

    def followers_key(self, key: str) -> str:
        return self.keys.followers(key)

    async def lead(self, key: str) -> Lease | None:
        """The lease if this request leads; None if another request is already generating.

        Raises RedisError/OSError when Redis is unreachable (the caller then goes solo).
        """
        lease = Lease(self, key)
        if not await self.client.set(self.lease_key(key), lease.token, nx=True, px=self.lease_ms):
            return None
        await self.client.delete(self.stream_key(key))  # a new generation: drop a finished one's leftovers
        lease.start()
        return lease

    async def follow(self, key: str, *, block_ms: int = 500) -> AsyncIterator[Event]:
        """The leader's events from the first one on, live; raises LeaderLostError if it dies."""
        stream, lease = self.stream_key(key), self.lease_key(key)
        if not await self.client.eval(_JOIN, 2, self.followers_key(key), lease, STREAM_RETENTION_S):
            await self.client.decr(self.followers_key(key))
            raise LeaderLostError(key)  # finished or abandoned just now: look again
        last = "0-0"
        quiet_since = time.monotonic()
        try:
            while True:
                batch: Any = await self.client.xread({stream: last}, count=256, block=block_ms)
                if batch:  # RESP2 reply: [[stream, [(id, fields), ...]]]
                    quiet_since = time.monotonic()
                    for entry_id, fields in batch[0][1]:
                        last = entry_id
                        event = decode(fields)
                        if isinstance(event, Failed) and event.code == CANCELLED:
                            raise LeaderLostError(key)
                        yield event
                        if isinstance(event, Done | Failed):
                            return
                elif not await self.client.exists(lease) and time.monotonic() - quiet_since > block_ms / 1000:
                    raise LeaderLostError(key)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await self.client.decr(self.followers_key(key))
