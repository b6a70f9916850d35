"""What an answer's events tell the rest of the service, watched from outside the pipeline.

`observed` wraps the pipeline's event stream and passes every event on unchanged, while it
notes the access log's fields, counts the outcome for /metrics and the dashboard, and counts
failures by stage. Whatever needs I/O runs detached, off the request's path. The pipeline's
steps know none of this. (Token budgets are not charged here: the generation reserves and
settles them itself, so a client that leaves early cannot skip the charge.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from service.answer.events import Admitted, Done, Event, Failed, Meta
from service.answer.schemas import RagRequest
from service.errors import (
    AdmissionRefused,
    DependencyUnavailable,
    Forbidden,
    GuardrailViolation,
    InvalidRequest,
    ServiceError,
)
from service.observability.logs import note
from service.observability.metrics import Metrics
from service.policy.routing import ModelChoice

Detach = Callable[[Coroutine[Any, Any, None]], None]


async def observed(
    events: AsyncIterator[Admitted | Event],
    request: RagRequest,
    *,
    metrics: Metrics | None,
    detach: Detach,
) -> AsyncIterator[Event]:
    """`events` as they come, minus `Admitted`; each one noted and counted on the way."""
    note(question_chars=len(request.question))  # for the request's access log line (service.observability.logs)
    question_hash = ""
    collections: tuple[str, ...] = ()
    meta: Meta | None = None
    try:
        async for event in events:
            if isinstance(event, Admitted):
                question_hash, collections = event.question_hash, event.collections
                note(question_hash=question_hash)
                continue
            note(**access_fields(event))
            if isinstance(event, Meta):
                meta = event
            elif isinstance(event, Done) and meta is not None and metrics is not None:
                detach(metrics.record(meta, event, question_hash, collections))
            elif isinstance(event, Failed) and metrics is not None:
                detach(metrics.failed(code=event.code, stage="stream"))
            yield event
    except ServiceError as exc:
        if metrics is not None:
            detach(metrics.failed(code=exc.code, stage=failure_stage(exc)))
        raise


def failure_stage(exc: ServiceError) -> str:
    """The `stage` label of a failure before the stream started, by the error's type.

    Failures after the first event are `"stream"`; `observed` tells those apart.
    """
    if isinstance(exc, GuardrailViolation):
        return "guardrail"
    if isinstance(exc, InvalidRequest):
        return "schema"
    if isinstance(exc, Forbidden):  # e.g. a filter to a collection the key may not read
        return "permission"
    if isinstance(exc, DependencyUnavailable) and exc.dependency == "database":
        return "database"
    if isinstance(exc, AdmissionRefused):  # not a busy Redis pool (PoolExhausted), also 503 `overloaded`
        return "admission"
    return "provider"  # providers, embedding, a followed generation that failed, budget, coalescing


def access_fields(event: Event) -> dict[str, Any]:
    """What the access log line says about an answer event: outcome, route, usage; never text."""
    if isinstance(event, Meta):
        route = event.route
        return {"cache": event.cache, "tier": route.tier, "provider": route.provider, "model": route.model}
    if isinstance(event, Done):
        usage = event.usage
        fields: dict[str, Any] = {
            "ttft_ms": event.ttft_ms,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cost_usd": usage.cost_usd,
        }
        if event.saved is not None:  # a hit or a coalesced answer: what the first generation cost
            fields["saved_cost_usd"] = event.saved.cost_usd
        return fields
    if isinstance(event, Failed):
        return {"error": event.code}
    return {}


def provider_attempts(metrics: Metrics | None) -> Callable[[ModelChoice, str, int | None], None] | None:
    """`generate`'s `on_attempt`: each candidate model's outcome before its first token, counted."""
    if metrics is None:
        return None

    def attempted(choice: ModelChoice, outcome: str, status: int | None) -> None:
        metrics.provider_attempt(provider=choice.provider, model=choice.model, outcome=outcome, status=status)

    return attempted
