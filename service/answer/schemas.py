"""The HTTP request and response bodies of the answer endpoints."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CacheMode = Literal["use", "bypass", "refresh"]
CacheOutcome = Literal["hit", "miss", "semantic_hit", "coalesced", "bypass"]


class RagRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Length limits with clear codes are the guardrails' job; this bound only stops absurd bodies.
    question: str = Field(max_length=100_000, description="The question, in any language.")
    top_k: int = Field(default=5, ge=1, le=50)
    model: str = Field(default="auto", max_length=200, description="auto | small | large | an allowed model")
    max_tokens: int = Field(default=512, ge=1, le=8192)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    filters: dict[str, str | list[str]] | None = Field(default=None, description='e.g. {"source": "handbook"}')
    cache: CacheMode = "use"


class RouteInfo(BaseModel):
    tier: str
    model: str
    provider: str
    reason: str


class SourceInfo(BaseModel):
    n: int
    chunk_id: int
    document: str
    source: str
    score: float
    snippet: str


class UsageInfo(BaseModel):
    input_tokens: int
    output_tokens: int
    cost_usd: float
    estimated: bool = False


class RagAnswer(BaseModel):
    request_id: str
    answer: str
    cache: CacheOutcome
    route: RouteInfo
    sources: list[SourceInfo]
    usage: UsageInfo
    latency_ms: float
    ttft_ms: float | None
    cached: bool
    extra: dict[str, Any] = Field(default_factory=dict)
