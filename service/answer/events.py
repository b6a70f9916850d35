"""The events of an answer, in the order every client sees them: meta, token…, done (or error).

One representation shared by the pipeline, the coalescer (which ships events to other
workers through Redis Streams) and the HTTP layer (SSE or JSON).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from service.answer.schemas import CacheOutcome, RouteInfo, SourceInfo, UsageInfo


@dataclass(frozen=True)
class Meta:
    request_id: str
    cache: CacheOutcome
    route: RouteInfo
    sources: list[SourceInfo]
    semantic: dict[str, Any] | None = None  # on a semantic hit: similarity and the matched question's hash
    standalone_question: str | None = None  # a follow-up's rewrite, when it differs from the question asked


@dataclass(frozen=True)
class Token:
    text: str


@dataclass(frozen=True)
class Done:
    usage: UsageInfo
    latency_ms: float
    ttft_ms: float | None
    cached: bool
    saved: UsageInfo | None = None  # on a hit or a coalesced answer: what it cost the first time


@dataclass(frozen=True)
class Failed:
    code: str
    message: str


Event = Meta | Token | Done | Failed


@dataclass(frozen=True)
class Admitted:
    """The question passed the guardrails. For the pipeline's observers only; never sent to a client."""

    question_hash: str  # of the redacted text: the access log and the top questions show it, never the text
    collections: tuple[str, ...] = ()  # the request's permission set, for the per-collection counter


@dataclass
class Clock:
    """One request's timing: `latency_ms` and `ttft_ms` of its `done` event."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def ms(self, at: float | None = None) -> float:
        return round(((at or time.perf_counter()) - self.started) * 1000, 2)

    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else self.ms(self.first_token)

    def token(self) -> None:
        """A token was shown; the first one sets the time to first token."""
        if self.first_token is None:
            self.first_token = time.perf_counter()


def event_payload(event: Event) -> tuple[str, dict[str, Any]]:
    """The SSE event name (`meta`, `token`, `done`, `error`) and the JSON payload of an event."""
    if isinstance(event, Meta):
        return "meta", {
            "request_id": event.request_id,
            "cache": event.cache,
            "route": event.route.model_dump(),
            "sources": [s.model_dump() for s in event.sources],
            **({"semantic": event.semantic} if event.semantic else {}),
            **({"standalone_question": event.standalone_question} if event.standalone_question else {}),
        }
    if isinstance(event, Token):
        return "token", {"text": event.text}
    if isinstance(event, Done):
        data: dict[str, Any] = {
            "usage": event.usage.model_dump(exclude={"estimated"}),
            "latency_ms": event.latency_ms,
            "ttft_ms": event.ttft_ms,
            "cached": event.cached,
        }
        if event.saved is not None:
            data["saved"] = event.saved.model_dump(exclude={"estimated"})
        return "done", data
    return "error", {"code": event.code, "message": event.message}


def encode(event: Event) -> dict[str, str]:
    name, data = event_payload(event)
    return {"e": name, "d": json.dumps(data, ensure_ascii=False, separators=(",", ":"))}


def decode(fields: dict[bytes, bytes]) -> Event:
    name = fields[b"e"].decode()
    data = json.loads(fields[b"d"])
    if name == "meta":
        return Meta(
            data["request_id"],
            data["cache"],
            RouteInfo(**data["route"]),
            [SourceInfo(**s) for s in data["sources"]],
            data.get("semantic"),
            data.get("standalone_question"),
        )
    if name == "token":
        return Token(data["text"])
    if name == "done":
        saved = UsageInfo(**data["saved"]) if "saved" in data else None
        return Done(UsageInfo(**data["usage"]), data["latency_ms"], data["ttft_ms"], data["cached"], saved)
    return Failed(data["code"], data["message"])
