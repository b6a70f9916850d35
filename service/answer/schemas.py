"""The HTTP request and response bodies of the answer endpoints."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

CacheMode = Literal["use", "bypass", "refresh"]
CacheOutcome = Literal["hit", "miss", "semantic_hit", "coalesced", "bypass"]


def _json_number(value: object) -> object:
    """JSON `true`/`false` and strings are not numbers, though pydantic's lax mode would coerce them."""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number")
    return value


JsonInt = Annotated[int, BeforeValidator(_json_number)]  # 3 and 3.0, not true or "3"
JsonFloat = Annotated[float, BeforeValidator(_json_number)]


class HistoryMessage(BaseModel):
    """One earlier turn of the conversation; roles and bounds are checked by service/policy/history.py."""

    model_config = ConfigDict(extra="forbid")

    role: str = Field(max_length=32, description="user | assistant | system")
    content: str | None = Field(default=None, max_length=100_000)


class RagRequest(BaseModel):
    # The example is what /docs shows and what the schema fuzzer sends first with a valid key.
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"question": "How do I flush the cache?"}]}
    )

    # Length limits with clear codes are the guardrails' job; this bound only stops absurd bodies.
    question: str = Field(max_length=100_000, description="The question, in any language.")
    top_k: JsonInt = Field(default=5, ge=1, le=50)
    model: str = Field(default="auto", max_length=200, description="auto | small | large | an allowed model")
    max_tokens: JsonInt = Field(default=512, ge=1, le=8192)
    temperature: JsonFloat = Field(default=0.2, ge=0.0, le=2.0)
    filters: dict[str, str | list[str]] | None = Field(
        default=None, description='e.g. {"source": "handbook", "collection": ["hr", "public"]}'
    )
    cache: CacheMode = "use"
    history: list[HistoryMessage] | None = Field(
        default=None,
        max_length=1000,  # the real bound is RAG_HISTORY_MAX_TURNS (413 history_too_long)
        description="Earlier turns, oldest first: follow-ups are answered (and cached) as standalone questions.",
    )


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
    collection: str = Field(default="default", description="The collection the document belongs to")
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
