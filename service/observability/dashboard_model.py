"""The dashboard's read model: the per-minute series in Redis, aggregated over a range.

`SeriesReader.summary` gives the totals of a range (outcomes, hit ratios, savings, TTFT and
latency percentiles, routes, blocks, failures, provider attempts, most-hit question hashes);
`SeriesReader.series` gives chart rows. Both read what `series.SeriesWriter` wrote, from every
worker, and answer with zeros (`available: False`) when Redis cannot be read.

No user text is ever read back: questions appear only as `question_hash` values.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from service.observability.outcomes import (
    ATTEMPT_OUTCOMES,
    AVOIDED,
    CLASSES,
    ELIGIBLE,
    GENERATED,
    NANO,
    OUTCOMES,
    hit_ratios,
    percentile,
)
from service.redis.keyspace import KEYS, REDIS_ERRORS, Keyspace

log = logging.getLogger(__name__)


@dataclass
class Bucket:
    """One aggregated bucket (a minute, an hour, a chart row or a whole range), decoded."""

    outcomes: Tally[str] = field(default_factory=Tally)
    ttft: dict[str, Tally[int]] = field(default_factory=dict)
    latency: dict[str, Tally[int]] = field(default_factory=dict)
    tokens_in: int = 0
    tokens_out: int = 0
    cost_nanos: int = 0
    saved_in: int = 0
    saved_out: int = 0
    saved_nanos: int = 0
    tiers: Tally[str] = field(default_factory=Tally)
    models: Tally[str] = field(default_factory=Tally)
    blocks: Tally[str] = field(default_factory=Tally)
    failures: Tally[tuple[str, str]] = field(default_factory=Tally)
    attempts: Tally[tuple[str, str]] = field(default_factory=Tally)  # (outcome, "provider/model")
    statuses: Tally[str] = field(default_factory=Tally)
    collections: Tally[tuple[str, str]] = field(default_factory=Tally)  # (collection label, outcome)

    @classmethod
    def of(cls, fields: Mapping[str, int]) -> Bucket:
        p = cls()
        scalars = {
            "tok:in": "tokens_in",
            "tok:out": "tokens_out",
            "cost": "cost_nanos",
            "sav:in": "saved_in",
            "sav:out": "saved_out",
            "sav:cost": "saved_nanos",
        }
        for name, value in fields.items():
            kind, _, rest = name.partition(":")
            if name in scalars:
                setattr(p, scalars[name], getattr(p, scalars[name]) + value)
            elif kind == "r":
                p.outcomes[rest] += value
            elif kind in ("tt", "lt"):
                outcome, _, index = rest.rpartition(":")
                target = p.ttft if kind == "tt" else p.latency
                target.setdefault(outcome, Tally())[int(index)] += value
            elif kind == "tier":
                p.tiers[rest] += value
            elif kind == "mdl":
                p.models[rest] += value
            elif kind == "blk":
                p.blocks[rest] += value
            elif kind == "f":
                stage, _, code = rest.partition(":")
                p.failures[(stage, code)] += value
            elif kind == "pa":
                outcome, _, model = rest.partition(":")
                p.attempts[(outcome, model)] += value
            elif kind == "ps":
                p.statuses[rest] += value
            elif kind == "col":
                label, _, outcome = rest.partition(":")
                p.collections[(label, outcome)] += value
        return p

    @property
    def answered(self) -> int:
        return sum(self.outcomes.values())

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def buckets(self, kind: str, cls: str) -> Tally[int]:
        source = self.ttft if kind == "ttft" else self.latency
        merged: Tally[int] = Tally()
        for outcome in CLASSES[cls]:
            merged.update(source.get(outcome, {}))
        return merged

    def hit_ratio(self) -> dict[str, float | None]:
        eligible = sum(self.outcomes[o] for o in ELIGIBLE)
        if not eligible:
            return {"exact": None, "semantic": None, "coalesced": None, "overall": None}
        return {k: round(v, 6) for k, v in hit_ratios(self.outcomes, eligible).items()}


def _split_model(key: str) -> tuple[str, str]:
    provider, _, model = key.partition("/")
    return provider, model


def _decode(raw: Mapping[Any, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, value in raw.items():
        try:
            out[name.decode() if isinstance(name, bytes) else str(name)] = int(value)
        except (TypeError, ValueError):  # a field another version wrote as a float: ignore it
            continue
    return out


class SeriesReader:
    """Reads the series every worker wrote; never raises on Redis errors."""

    def __init__(self, redis: aioredis.Redis, *, keys: Keyspace = KEYS, clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.keys = keys
        self._clock = clock

    def _minute(self) -> int:
        return int(self._clock() // 60)

    def _keys_for(self, start: int, end: int) -> list[str]:
        """Keys whose sum is exactly minutes start..end: hourly roll-ups for whole hours, minutes for the edges."""
        first_hour, last_hour = -(-start // 60), (end + 1) // 60 - 1
        if first_hour > last_hour:
            return [self.keys.metrics_minute(m) for m in range(start, end + 1)]
        return [
            *(self.keys.metrics_minute(m) for m in range(start, first_hour * 60)),
            *(self.keys.metrics_hour(h) for h in range(first_hour, last_hour + 1)),
            *(self.keys.metrics_minute(m) for m in range((last_hour + 1) * 60, end + 1)),
        ]

    async def _read(
        self, spans: list[tuple[int, int]], top: tuple[int, int, int] | None = None
    ) -> tuple[list[Bucket], list[tuple[str, int]]] | None:
        """Aggregate each (start, end) minute span, and optionally the top questions; None if Redis fails."""
        plans = [self._keys_for(start, end) for start, end in spans]
        keys = list(dict.fromkeys(k for plan in plans for k in plan))
        tmp = self.keys.metrics_scratch(uuid.uuid4().hex)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                if top is not None:
                    first_hour, last_hour, n = top
                    pipe.zunionstore(tmp, [self.keys.metrics_top(h) for h in range(first_hour, last_hour + 1)])
                    pipe.expire(tmp, 30)
                    pipe.zrevrange(tmp, 0, n - 1, withscores=True)
                    pipe.delete(tmp)
                replies = await pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("metrics: cannot read the series (%s)", type(exc).__name__)
            return None
        by_key = {key: _decode(reply) for key, reply in zip(keys, replies, strict=False)}
        parsed = []
        for plan in plans:
            total: Tally[str] = Tally()
            for key in plan:
                total.update(by_key[key])
            parsed.append(Bucket.of(total))
        questions: list[tuple[str, int]] = []
        if top is not None:
            ranked = replies[len(keys) + 2]
            questions = [(m.decode() if isinstance(m, bytes) else str(m), int(s)) for m, s in ranked]
        return parsed, questions

    async def summary(self, *, minutes: int, top: int = 10) -> dict[str, Any]:
        """Totals for the last `minutes` (including the current, partial minute), across all workers.

        Most-hit questions are counted per hour, so their window is widened to whole hours.
        """
        minutes = max(1, int(minutes))
        end = self._minute()
        start = end - minutes + 1
        read = await self._read([(start, end)], (start // 60, end // 60, max(1, top)))
        parsed, questions = read if read is not None else ([Bucket()], [])
        return self._summarize(parsed[0], questions, start, end, minutes, available=read is not None)

    async def series(self, *, minutes: int, step: int = 1) -> list[dict[str, Any]]:
        """Rows of `step` minutes, oldest to newest, covering the last `minutes`; empty rows are zeros.

        Rows start at multiples of `step` (hourly rows on the hour, `t` in epoch seconds); the
        last one holds the current minute, the first only the part inside the window, so
        the rows sum to `summary`. Redis down: the same rows, all zero.
        """
        step = max(1, int(step))
        end = self._minute()
        start = end - max(1, int(minutes)) + 1
        last_start = end - end % step
        starts = range(start - start % step, last_start + 1, step)
        # The first row is clipped to the window, so the rows add up to `summary(minutes=...)` exactly.
        spans = [(max(s, start), min(s + step - 1, end)) for s in starts]
        read = await self._read(spans)
        rows = read[0] if read is not None else [Bucket() for _ in spans]
        return [_row(s * 60, parsed) for s, parsed in zip(starts, rows, strict=True)]

    def _summarize(
        self, p: Bucket, questions: list[tuple[str, int]], start: int, end: int, minutes: int, *, available: bool
    ) -> dict[str, Any]:
        by_outcome = {o: p.outcomes.get(o, 0) for o in OUTCOMES}
        by_outcome.update({o: n for o, n in p.outcomes.items() if o not in by_outcome})
        attempts: Tally[str] = Tally()
        per_model: dict[str, dict[str, Any]] = {}
        for (outcome, key), n in p.attempts.items():
            attempts[outcome] += n
            provider, model = _split_model(key)
            row = per_model.setdefault(
                key, {"provider": provider, "model": model, **dict.fromkeys(ATTEMPT_OUTCOMES, 0)}
            )
            row[outcome] = row.get(outcome, 0) + n
        return {
            "minutes": minutes,
            "from": start * 60,
            "to": (end + 1) * 60,
            "available": available,  # False: Redis could not be read, every number below is 0
            "requests": {
                "answered": p.answered,
                "failed": p.failed,
                "total": p.answered + p.failed,
                "by_outcome": by_outcome,
            },
            "hit_ratio": p.hit_ratio(),
            "provider_calls": {
                "made": sum(p.outcomes[o] for o in GENERATED),
                "avoided": sum(p.outcomes[o] for o in AVOIDED),
            },
            "coalesced_followers": p.outcomes.get("coalesced", 0),
            "tokens": {"input": p.tokens_in, "output": p.tokens_out, "cost_usd": p.cost_nanos / NANO},
            "saved": {
                "input_tokens": p.saved_in,
                "output_tokens": p.saved_out,
                "tokens": p.saved_in + p.saved_out,
                "cost_usd": p.saved_nanos / NANO,
            },
            "ttft_ms": {cls: _quantiles(p.buckets("ttft", cls)) for cls in CLASSES},
            "latency_ms": {cls: _quantiles(p.buckets("latency", cls)) for cls in CLASSES},
            "routes": {
                "tiers": dict(p.tiers.most_common()),
                "models": [
                    {"provider": _split_model(k)[0], "model": _split_model(k)[1], "count": n}
                    for k, n in p.models.most_common()
                ],
            },
            "blocks": {"total": sum(p.blocks.values()), "by_code": dict(p.blocks.most_common())},
            "failures": [{"stage": stage, "code": code, "count": n} for (stage, code), n in p.failures.most_common()],
            "provider": {
                "attempts": {o: attempts.get(o, 0) for o in ATTEMPT_OUTCOMES}
                | {o: n for o, n in attempts.items() if o not in ATTEMPT_OUTCOMES},
                "errors": attempts.get("error", 0) + attempts.get("timeout", 0),
                "retries": attempts.get("retry", 0),
                "by_status": dict(p.statuses.most_common()),
                "by_model": sorted(per_model.values(), key=lambda r: (r["provider"], r["model"])),
            },
            "top_questions": [{"hash": h, "hits": n} for h, n in questions],
            "collections": _by_collection(p.collections),
        }


def _by_collection(counts: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """Answered and avoided (served without a generation) requests per `collection` label.

    A request that could read several labelled collections counts under each of them.
    """
    out: dict[str, dict[str, int]] = {}
    for (label, outcome), n in sorted(counts.items()):
        row = out.setdefault(label, {"answered": 0, "avoided": 0})
        row["answered"] += n
        if outcome in AVOIDED:
            row["avoided"] += n
    return out


def _quantiles(buckets: Mapping[int, int]) -> dict[str, Any]:
    return {"count": sum(buckets.values()), "p50": percentile(buckets, 0.5), "p95": percentile(buckets, 0.95)}


def _row(t: int, p: Bucket) -> dict[str, Any]:
    ratio = p.hit_ratio()
    hit_ttft, miss_ttft = p.buckets("ttft", "hit"), p.buckets("ttft", "miss")
    return {
        "t": t,
        **{o: p.outcomes.get(o, 0) for o in OUTCOMES},
        "answered": p.answered,
        "failed": p.failed,
        "blocked": sum(p.blocks.values()),
        "hit_ratio": ratio["overall"],
        "exact_ratio": ratio["exact"],
        "semantic_ratio": ratio["semantic"],
        "coalesced_ratio": ratio["coalesced"],
        "tokens": p.tokens_in + p.tokens_out,
        "cost_usd": p.cost_nanos / NANO,
        "saved_tokens": p.saved_in + p.saved_out,
        "saved_cost_usd": p.saved_nanos / NANO,
        "ttft_p50_hit": percentile(hit_ttft, 0.5),
        "ttft_p95_hit": percentile(hit_ttft, 0.95),
        "ttft_p50_miss": percentile(miss_ttft, 0.5),
        "ttft_p95_miss": percentile(miss_ttft, 0.95),
        "provider_errors": sum(n for (o, _), n in p.attempts.items() if o in ("error", "timeout")),
    }
