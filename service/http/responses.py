"""The error responses each route can give, declared for the OpenAPI schema.

FastAPI documents only 200 and its own 422 shape (`{"detail": [...]}`), which this service
never sends: every error is `{"error": {"code", "message"}}` (service/http/errors.py), and under
`/v1/` OpenAI's `{"error": {"message", "type", "param", "code"}}`. Routes pass
`responses=error_responses(...)` so the schema says what clients really get; the schema
fuzz test (tests/integration/test_schema_fuzz.py) holds every response to it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `prompt_injection`, `unauthorized`.")
    message: str = Field(description="What went wrong; never echoes the request's content.")


class ErrorResponse(BaseModel):
    """The body of every error answered before a stream starts: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="OpenAI's error type, e.g. `invalid_request_error`, `rate_limit_error`.")
    param: str | None = Field(description="The request field at fault, when there is one.")
    code: str = Field(description="The same stable code as on `/rag/*`.")


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error shape, so its SDKs raise their usual exception classes."""

    error: OpenAIErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}

_WHEN: dict[int, str] = {
    400: "Rejected by the input guardrails, a history message of the wrong shape, or something unsupported.",
    401: "Missing, unknown or revoked API key.",
    403: "The API key lacks the scope this endpoint needs.",
    404: "No such resource.",
    413: "The request body exceeds RAG_MAX_BODY_BYTES, or the history RAG_HISTORY_MAX_TURNS / _MAX_TOKENS.",
    422: "The request does not match the schema.",
    429: "Rate limit, token budget, answers in flight or failed-authentication limit reached.",
    502: "The model provider failed before the answer was complete.",
    503: "A dependency is unavailable, or the service is overloaded.",
}

AUTH = (401, 403, 429, 503)  # what any endpoint behind `requires(...)` can answer
ANSWER = (*AUTH, 400, 413, 422)  # plus guardrails, body size and schema, for the answer endpoints


def error_responses(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route or router: the error shape for each status."""
    model = OpenAIErrorResponse if openai else ErrorResponse
    declared: dict[int | str, dict[str, Any]] = {}
    for status in sorted(set(statuses)):
        declared[status] = {"model": model, "description": _WHEN[status]}
        if status in (429, 503):
            declared[status]["headers"] = _RETRY_AFTER
    return declared
