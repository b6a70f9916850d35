"""The Redis keyspace: every key under one prefix, and an answer-cache flush that spares limits and metrics."""

from __future__ import annotations

import logging
from fnmatch import fnmatchcase

import pytest

import service.redis.keyspace as keyspace
from service.errors import PoolExhausted
from service.redis.keyspace import BEST_EFFORT_ERRORS, KEYS, REDIS_ERRORS, CoolDown, Keyspace


def every_key(keys: Keyspace) -> dict[str, str]:
    return {
        "answer": keys.answer("k"),
        "deps": keys.deps(7),
        "deps_none": keys.deps(None),
        "corpus_version": keys.corpus_version,
        "rewrite": keys.rewrite("k"),
        "verdict": keys.verdict("k", "q"),
        "lease": keys.lease("k"),
        "stream": keys.stream("k"),
        "followers": keys.followers("k"),
        "rpm": keys.requests_per_minute("id"),
        "budget": keys.token_budget("id"),
        "budget_by_day": keys.token_budget_by_day("id", "20261202"),
        "authfail": keys.auth_failures,
        "inflight": keys.inflight_slots("id"),
        "minute": keys.metrics_minute(1),
        "hour": keys.metrics_hour(1),
        "top": keys.metrics_top(1),
        "scratch": keys.metrics_scratch("t"),
    }


def flushed(keys: Keyspace, key: str) -> bool:
    return any(fnmatchcase(key, pattern) for pattern in keys.flushed_by_answer_cache)


def test_every_key_lives_under_the_prefix() -> None:
    for name, key in every_key(Keyspace("other")).items():
        assert key.startswith("other:"), name


def test_stored_key_names_are_unchanged() -> None:
    """Keys already in a running Redis (and tests/bench that scan them) keep their names."""
    assert KEYS.answer("k") == "ragcache:answer:k"
    assert KEYS.deps(None) == "ragcache:deps:none"
    assert KEYS.corpus_version == "ragcache:corpus:generation"
    assert KEYS.lease("k") == "ragcache:inflight:k"
    # the day's budget counter before it became one hash per key: still read once a day
    assert KEYS.token_budget_by_day("abc", "20261122") == "ragcache:limit:tokens:abc:20261122"
    assert KEYS.metrics_minute(5) == "ragcache:metrics:m:5"


def test_the_limits_keep_one_key_per_api_key_whatever_the_day() -> None:
    """Limit keys have no TTL (a full Redis must not evict a cap), so none may be named per period."""
    assert KEYS.requests_per_minute("abc") == "ragcache:limit:rpm:abc"
    assert KEYS.token_budget("abc") == "ragcache:limit:tokens:abc"  # the day is inside the hash
    assert KEYS.inflight_slots("abc") == "ragcache:limit:inflight:abc"
    assert KEYS.auth_failures == "ragcache:limit:authfail"  # one for every address; reset each minute


def test_an_answer_cache_flush_covers_cache_and_coalescing_keys_only() -> None:
    keys = every_key(KEYS)
    kept = {"rpm", "budget", "budget_by_day", "authfail", "inflight", "minute", "hour", "top", "scratch"}
    assert {name for name, key in keys.items() if not flushed(KEYS, key)} == kept
    assert not flushed(KEYS, "someone-else:answer:k")


def test_cool_down_switches_off_for_a_while_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cool = CoolDown("cache off")
    assert cool.available
    monkeypatch.setattr(keyspace, "COOL_DOWN_S", 3600.0)
    with caplog.at_level(logging.WARNING, logger="service.redis.keyspace"):
        cool.failed("get", ConnectionError())
        cool.failed("put", ConnectionError())
    assert not cool.available
    assert [r.getMessage() for r in caplog.records] == ["redis unavailable, cache off for 3600s (get: ConnectionError)"]
    monkeypatch.setattr(keyspace, "COOL_DOWN_S", 0.0)
    cool.failed("get", ConnectionError())
    assert cool.available


def test_a_busy_pool_is_not_redis_down(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """PoolExhausted never switches a caller off, and fail-soft `except REDIS_ERRORS` clauses let it through."""
    monkeypatch.setattr(keyspace, "COOL_DOWN_S", 3600.0)
    cool = CoolDown("cache off")
    with caplog.at_level(logging.WARNING, logger="service.redis.keyspace"):
        cool.failed("get", PoolExhausted("requests"))
    assert cool.available and not caplog.records
    assert not isinstance(PoolExhausted("requests"), REDIS_ERRORS)  # the request path answers 503 instead
    assert isinstance(PoolExhausted("requests"), BEST_EFFORT_ERRORS)  # background work retries later
