"""Domain exceptions: why a request is refused or cannot be served right now.

Code below the HTTP layer raises these; service/http/errors.py alone turns each class into a
status code, and `retry_after` into a `Retry-After` header. `code` is the stable
machine-readable reason clients see (`prompt_injection`, `database_unavailable`, …) and
`message` never echoes the request's content.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request that cannot be answered, with the reason a client may show."""

    def __init__(self, code: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds worth waiting before asking again, when that helps

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class GuardrailViolation(ServiceError):
    """A question the input guardrails reject (service/policy/guardrails.py)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


class InvalidRequest(ServiceError):
    """A well-formed request that asks for something that does not exist (a filter, a model)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


class UnknownModel(InvalidRequest):
    def __init__(self, message: str) -> None:
        super().__init__("unknown_model", message)


class Forbidden(ServiceError):
    """The caller's key may not do this (e.g. `"cache": "refresh"` without the admin scope)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


class RateLimited(ServiceError):
    """The caller (an API key or a client address) asked too often; `retry_after` says when to return."""

    def __init__(self, code: str, message: str, retry_after: int) -> None:
        super().__init__(code, message, retry_after=retry_after)


class BudgetExceeded(RateLimited):
    """The key's provider tokens for the day are spent; cached answers are still served."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__("token_budget_exceeded", message, retry_after)


class DependencyUnavailable(ServiceError):
    """Something the answer needs (`dependency`: database, embedding, provider) is down or failing."""

    def __init__(self, dependency: str, code: str, message: str, retry_after: int = 5) -> None:
        super().__init__(code, message, retry_after=retry_after)
        self.dependency = dependency


class NoProviderAvailable(DependencyUnavailable):
    """Every candidate model failed before its first token."""

    def __init__(self, message: str) -> None:
        super().__init__("provider", "providers_unavailable", message)


class LeaderFailed(DependencyUnavailable):
    """The request generating this answer for us failed before its first event; its code says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__("database" if code == "database_unavailable" else "provider", code, message)


class Overloaded(ServiceError):
    """The service cannot take this request on now (no generation could be joined or started, a busy pool)."""

    def __init__(self, code: str, message: str, retry_after: int = 1) -> None:
        super().__init__(code, message, retry_after=retry_after)


class AdmissionRefused(Overloaded):
    """The worker's admission gate had no slot for this request within its wait budget
    (service/answer/admission.py): 503 `overloaded`, counted under the `admission` stage."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__("overloaded", message, retry_after=retry_after)


class HistoryViolation(ServiceError):
    """A conversation history of the wrong shape (an unknown role, an empty message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)


class HistoryTooLarge(HistoryViolation):
    """A conversation history over its bounds (`history_too_long`, `history_too_many_tokens`)."""


class PoolExhausted(Overloaded):
    """No connection of a worker's own Redis pool came free in time: back-pressure, not "Redis is down".

    Raised by the pool itself (service/redis/client.py); it is never a reason to fail open or to
    switch the cache off (service/redis/keyspace.py), so on the request path it is a 503 to retry.
    """

    def __init__(self, pool: str) -> None:
        super().__init__("overloaded", "the service is busy right now; retry shortly", retry_after=1)
        self.pool = pool


class AuthUnavailable(DependencyUnavailable):
    """The API key is not known to this worker and Postgres cannot be asked right now."""

    def __init__(self, reason: str) -> None:
        super().__init__("database", "auth_unavailable", "cannot verify the API key right now", retry_after=5)
        self.reason = reason
