"""Domain errors: the one mapping to HTTP (status, code, Retry-After) and the metrics stage of each."""

from __future__ import annotations

import pytest

from service.answer.observe import failure_stage
from service.errors import (
    AdmissionRefused,
    BudgetExceeded,
    DependencyUnavailable,
    Forbidden,
    GuardrailViolation,
    InvalidRequest,
    LeaderFailed,
    NoProviderAvailable,
    Overloaded,
    PoolExhausted,
    RateLimited,
    ServiceError,
    UnknownModel,
)
from service.http.errors import api_error
from service.policy.guardrails import GuardrailViolation as PolicyViolation

CASES: list[tuple[ServiceError, int, str, str | None, str]] = [
    # error, status, code, Retry-After, metrics stage
    (GuardrailViolation("prompt_injection", "no"), 400, "prompt_injection", None, "guardrail"),
    (InvalidRequest("invalid_filters", "bad filter"), 422, "invalid_filters", None, "schema"),
    (UnknownModel("model must be one of: auto"), 422, "unknown_model", None, "schema"),
    (Forbidden("collection_forbidden", "not yours"), 403, "collection_forbidden", None, "permission"),
    (RateLimited("rate_limited", "slow down", 7), 429, "rate_limited", "7", "provider"),
    (BudgetExceeded("spent", 3600), 429, "token_budget_exceeded", "3600", "provider"),
    (DependencyUnavailable("database", "database_unavailable", "down"), 503, "database_unavailable", "5", "database"),
    (
        DependencyUnavailable("embedding", "embedding_unavailable", "down"),
        503,
        "embedding_unavailable",
        "5",
        "provider",
    ),
    (NoProviderAvailable("every model failed"), 503, "providers_unavailable", "5", "provider"),
    (LeaderFailed("database_unavailable", "down"), 503, "database_unavailable", "5", "database"),
    (LeaderFailed("providers_unavailable", "down"), 503, "providers_unavailable", "5", "provider"),
    (Overloaded("coalescing_failed", "busy"), 503, "coalescing_failed", "1", "provider"),
    (AdmissionRefused("no admission slot", 1), 503, "overloaded", "1", "admission"),
    (Overloaded("overloaded", "busy"), 503, "overloaded", "1", "provider"),  # by its class, not its code
    (PoolExhausted("limits"), 503, "overloaded", "1", "provider"),  # a busy Redis pool is not the admission gate
]


@pytest.mark.parametrize(("error", "status", "code", "retry_after", "stage"), CASES)
def test_each_domain_error_has_one_status_code_and_stage(
    error: ServiceError, status: int, code: str, retry_after: str | None, stage: str
) -> None:
    http = api_error(error)
    assert (http.status, http.code, http.message) == (status, code, error.message)
    assert http.headers.get("Retry-After") == retry_after
    assert failure_stage(error) == stage


def test_the_guardrails_raise_the_domain_error() -> None:
    assert PolicyViolation is GuardrailViolation
    assert (
        str(GuardrailViolation("empty_question", "The question is empty.")) == "empty_question: The question is empty."
    )
