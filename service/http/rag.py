"""HTTP endpoints of the answer pipeline: `/rag/stream` (SSE) and `/rag/answer` (JSON)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from service.answer.events import Done, Event, Failed, Meta, Token, event_payload
from service.answer.observe import access_fields
from service.answer.pipeline import AnswerService
from service.answer.schemas import RagAnswer, RagRequest
from service.errors import Forbidden, ServiceError
from service.http.auth import AuthFirstRoute, Principal, requires
from service.http.errors import APIError, api_error
from service.http.responses import ANSWER, error_responses
from service.observability.logs import note
from service.observability.tracing import Span, Tracing
from service.redis.limits import TokenBudget

router = APIRouter(
    tags=["rag"],
    dependencies=[Depends(requires("query"))],
    responses=error_responses(*ANSWER),
    route_class=AuthFirstRoute,
)
log = logging.getLogger(__name__)


def request_id(request: Request) -> str:
    """Set by the RequestID middleware (the caller's, when sane, or a fresh one)."""
    return str(request.state.request_id)


def _service(request: Request) -> AnswerService:
    service: AnswerService = request.app.state.resources.answers
    return service


async def answer_events(request: Request, body: RagRequest) -> tuple[Event, AsyncIterator[Event]]:
    """Run the pipeline up to its first event, so errors before it are plain HTTP errors.

    Every answer endpoint (`/rag/*`, `/v1/chat/completions`) goes through here, after
    `requires(...)` set the caller: each request counts against the key's rate (hits too);
    the pipeline checks and charges its token budget only when it generates. With tracing
    on, the answer runs under a `rag.request` span (service/observability/tracing.py).
    """
    principal: Principal = request.state.principal
    if body.cache == "refresh" and "admin" not in principal.scopes:
        # A refresh replaces the answer every key is served; re-rolling it until a bad answer
        # sticks for the cache's lifetime must not be open to every query key.
        raise Forbidden("refresh_forbidden", 'cache "refresh" needs an API key with the admin scope')
    limiter = request.app.state.resources.limiter
    await limiter.check_request(principal)
    rid = request_id(request)
    answer = _service(request).answer(body, rid, TokenBudget(limiter, principal), principal.collections)
    tracing: Tracing = request.app.state.tracing
    events = tracing.stream(answer, _describe_root, request_id=rid, key_id=principal.key_id)
    first = await anext(events)

    async def rest() -> AsyncIterator[Event]:
        yield first
        async for event in events:
            yield event

    return first, rest()


def _describe_root(root: Span, item: Event | BaseException) -> None:
    """What a traced answer's root span says: the access line's fields (outcome, route, usage) or the error."""
    if isinstance(item, Token):
        return
    if isinstance(item, ServiceError):
        error = api_error(item)
        root.set(error=error.code, http_status=error.status)
    elif not isinstance(item, BaseException):
        root.set(**access_fields(item))
        if isinstance(item, Failed):
            root.error(item.code)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"


def sse_bytes(event: Event) -> bytes:
    """`sse_event(event).encode()`, without building the object: ~35 µs of a ~900 µs cache hit.

    One `data:` line is enough because JSON never holds a raw line break.
    """
    name, data = event_payload(event)
    return f"event: {name}\r\ndata: {json.dumps(data, ensure_ascii=False)}\r\n\r\n".encode()


def sse_event(event: Event) -> ServerSentEvent:
    name, data = event_payload(event)
    return ServerSentEvent(data=json.dumps(data, ensure_ascii=False), event=name)


@router.post(
    "/rag/stream",
    response_class=EventSourceResponse,
    responses={200: {"description": "meta, token…, done (or error) events", "content": {"text/event-stream": {}}}},
)
async def rag_stream(body: RagRequest, request: Request) -> Response:
    """Answer as Server-Sent Events: meta, token…, done (or error)."""
    rid = request_id(request)
    first, events = await answer_events(request, body)
    if isinstance(first, Meta) and first.cache in ("hit", "semantic_hit"):
        # A cached answer is complete already: the same events as one body, without the
        # streaming machinery (tasks, cancel scopes, pings) that costs more than the hit itself.
        body_bytes = b"".join([sse_bytes(event) async for event in events])
        return Response(body_bytes, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)

    failure = {"code": "internal_error", "message": "the answer stream failed unexpectedly"}
    return sse_response(
        (sse_event(event) async for event in events), rid, ServerSentEvent(json.dumps(failure), event="error")
    )


def sse_response(items: AsyncIterator[ServerSentEvent], rid: str, failure: ServerSentEvent) -> EventSourceResponse:
    """A live stream that ends with `failure` if a bug breaks it, never with a cut connection."""

    async def guarded() -> AsyncIterator[ServerSentEvent]:
        try:
            async for item in items:
                yield item
        except Exception:
            log.exception("stream failed (request %s)", rid)
            note(error="internal_error")
            yield failure

    return EventSourceResponse(guarded(), headers=SSE_HEADERS, ping=15)


async def collect(events: AsyncIterator[Event]) -> tuple[str, Done]:
    """The whole answer text and its `done` event; a stream that failed is a 502 with its own code."""
    pieces: list[str] = []
    done: Done | None = None
    failed: Failed | None = None
    async for event in events:  # to the end, so the pipeline finishes its bookkeeping
        if isinstance(event, Token):
            pieces.append(event.text)
        elif isinstance(event, Done):
            done = event
        elif isinstance(event, Failed):
            failed = event
    if failed is not None:
        raise APIError(502, failed.code, failed.message)
    if done is None:
        raise APIError(502, "generation_failed", "the answer ended without completing")
    return "".join(pieces), done


@router.post("/rag/answer", response_model=RagAnswer, responses=error_responses(502))
async def rag_answer(body: RagRequest, request: Request) -> RagAnswer:
    """The same pipeline, collected into one JSON document."""
    rid = request_id(request)
    first, events = await answer_events(request, body)
    assert isinstance(first, Meta)
    answer, done = await collect(events)
    return RagAnswer(
        request_id=rid,
        answer=answer,
        cache=first.cache,
        route=first.route,
        sources=first.sources,
        usage=done.usage,
        latency_ms=done.latency_ms,
        ttft_ms=done.ttft_ms,
        cached=done.cached,
        extra={"saved": done.saved.model_dump()} if done.saved else {},
    )
