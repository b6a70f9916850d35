"""The OpenAI-compatible face of the pipeline: `POST /v1/chat/completions` and `GET /v1/models`.

Why it exists: any OpenAI client (the SDKs, LangChain, chat UIs) can ask ragcache by
pointing its `base_url` at `/v1`. It is a translation layer only: a chat request becomes
a `RagRequest`, runs through `answer_events` like every answer endpoint, and the events
are written back in the Chat Completions format.

- Every endpoint here needs an API key with the "query" scope (`Authorization: Bearer`,
  which is how the SDKs send `api_key`); errors use OpenAI's shape (service/http/errors.py).
- The question is the last message, which must come from the user. The earlier messages are
  the conversation: user and assistant turns are the history (a follow-up is answered, and
  cached, as its standalone question, reported as `rag.standalone_question`), system and
  developer messages are instructions to the generator that never override the citation
  rules. Tool messages are skipped. Too many or too long: 413 `history_too_long` /
  `history_too_many_tokens`; a message of the wrong shape: 400 `invalid_history`.
- ragcache's own options travel in an extra body field, `"rag": {"top_k", "filters",
  "cache"}` (the openai SDK sends it with `extra_body`); its results come back in a
  top-level `"rag"` field: request id, cache outcome, route and sources on the
  `chat.completion` object and the first stream chunk; usage with cost, latency and
  `cached` on the object and the stream's finish chunk.
- OpenAI fields that ask for something the pipeline cannot do (n > 1, tools, JSON
  output, logprobs, audio, …) are a 400 `unsupported_parameter`; sampling and bookkeeping
  hints (top_p, stop, seed, user, …) are accepted and ignored; fields OpenAI does not
  have are a 422 like on `/rag/*`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Final, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import ServerSentEvent

from service.answer.events import Done, Event, Meta, Token, event_payload
from service.answer.pipeline import AnswerService
from service.answer.schemas import CacheMode, JsonFloat, JsonInt, RagRequest
from service.errors import ServiceError
from service.http.auth import AuthFirstRoute, requires
from service.http.errors import APIError, api_error, openai_error
from service.http.rag import SSE_HEADERS, SSE_MEDIA_TYPE, answer_events, collect, request_id, sse_response
from service.http.responses import ANSWER, AUTH, error_responses
from service.policy.guardrails import (
    CONTROL_CHARACTERS,
    EMPTY_QUESTION,
    PII_DETECTED,
    PROMPT_INJECTION,
    QUESTION_TOO_LONG,
    TOO_MANY_TOKENS,
)
from service.policy.history import HISTORY_TOO_LONG, HISTORY_TOO_MANY_TOKENS, INVALID_HISTORY

# Every /v1 endpoint needs a key with the "query" scope; the SDKs send it as `Authorization: Bearer`.
router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(requires("query"))],
    responses=error_responses(*AUTH, openai=True),
    route_class=AuthFirstRoute,
)
log = logging.getLogger(__name__)

OWNER: Final = "ragcache"  # owned_by of the virtual models auto/small/large
_GUARDRAIL_CODES: Final = frozenset(
    {EMPTY_QUESTION, QUESTION_TOO_LONG, TOO_MANY_TOKENS, CONTROL_CHARACTERS, PROMPT_INJECTION, PII_DETECTED}
)
_HISTORY_CODES: Final = frozenset({INVALID_HISTORY, HISTORY_TOO_LONG, HISTORY_TOO_MANY_TOKENS})


# --- request --------------------------------------------------------------------------------


class ContentPart(BaseModel):
    """One part of a multi-part message; only text parts can be asked about."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """An OpenAI chat message; extra OpenAI keys (name, tool_calls, …) are allowed and unused."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. include_obfuscation: nothing to obfuscate here

    include_usage: bool = False


class RagOptions(BaseModel):
    """ragcache's own request options; their bounds are RagRequest's, checked when it is built."""

    model_config = ConfigDict(extra="forbid")

    top_k: JsonInt | None = None
    filters: dict[str, str | list[str]] | None = None
    cache: CacheMode | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"model": "auto", "messages": [{"role": "user", "content": "What is RRF?"}]}]},
    )

    messages: list[ChatMessage] = Field(min_length=1)
    model: str = "auto"
    max_tokens: JsonInt | None = None
    max_completion_tokens: JsonInt | None = None  # wins over max_tokens when both are set
    temperature: JsonFloat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    rag: RagOptions | None = None

    # OpenAI features the pipeline cannot provide: only their "off" values pass (see _reject_unsupported).
    n: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None

    # Sampling and bookkeeping hints with no place in the pipeline: accepted and ignored.
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


def _unsupported(param: str, what: str) -> APIError:
    return APIError(400, "unsupported_parameter", f"{param}: {what} is not supported by ragcache", param=param)


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    """Refuse rather than silently answer something other than what was asked for."""
    if body.n not in (None, 1):
        raise _unsupported("n", "more than one choice")
    if body.tools or body.functions:
        raise _unsupported("tools" if body.tools else "functions", "tool calling")
    for name, choice in (("tool_choice", body.tool_choice), ("function_call", body.function_call)):
        if choice not in (None, "none", "auto"):
            raise _unsupported(name, "tool calling")
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise _unsupported("response_format", "a response format other than text")
    if body.logprobs or body.top_logprobs:
        raise _unsupported("logprobs" if body.logprobs else "top_logprobs", "log probabilities")
    if body.audio is not None or (body.modalities is not None and body.modalities != ["text"]):
        raise _unsupported("audio" if body.audio is not None else "modalities", "output other than text")
    if body.prediction is not None:
        raise _unsupported("prediction", "predicted output")
    if body.web_search_options is not None:
        raise _unsupported("web_search_options", "web search")


def _question(body: ChatCompletionRequest) -> tuple[int, str]:
    """The last message is the question; it must be the user's, in text."""
    index = len(body.messages) - 1
    last = body.messages[index]
    param = f"messages.{index}"
    if last.role != "user":
        raise APIError(400, "invalid_messages", "the last message must have role 'user'", param=f"{param}.role")
    if last.content is None or isinstance(last.content, str):
        return index, last.content or ""
    texts: list[str] = []
    for part in last.content:
        if part.type != "text" or part.text is None:
            # The part's type is not echoed: like all errors here, nothing the caller wrote comes back.
            raise APIError(400, "unsupported_content", "only text parts can be asked about", param=param)
        texts.append(part.text)
    return index, "\n".join(texts)


def _text(content: str | list[ContentPart] | None) -> str | None:
    """A history message's text: its text parts (images and other parts are not part of the history)."""
    if content is None or isinstance(content, str):
        return content
    return "\n".join(part.text for part in content if part.type == "text" and part.text is not None)


def _history(body: ChatCompletionRequest, index: int) -> list[dict[str, str | None]]:
    """The messages before the question as `/rag/*` history; tool results have no place in it."""
    return [
        {"role": m.role, "content": _text(m.content)}
        for m in body.messages[:index]
        if m.role not in ("tool", "function")
    ]


def to_rag_request(body: ChatCompletionRequest) -> tuple[RagRequest, int]:
    """The RagRequest this chat request means; RagRequest's bounds apply, reported at the chat field."""
    _reject_unsupported(body)
    index, question = _question(body)
    tokens_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    data: dict[str, Any] = {"question": question, "model": body.model}
    if history := _history(body, index):
        data["history"] = history
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None:
        data["max_tokens"] = max_tokens
    if body.temperature is not None:
        data["temperature"] = body.temperature
    if body.rag is not None:
        data.update(body.rag.model_dump(exclude_none=True))
    where: dict[str, tuple[str | int, ...]] = {
        "question": ("messages", index, "content"),
        "max_tokens": (tokens_field,),
        "top_k": ("rag", "top_k"),
        "filters": ("rag", "filters"),
        "cache": ("rag", "cache"),
        "history": ("messages",),
    }
    try:
        return RagRequest.model_validate(data), index
    except ValidationError as exc:
        errors = [
            {**err, "loc": ("body", *where.get(str(err["loc"][0]), err["loc"][:1]), *err["loc"][1:])}
            if err["loc"]
            else {**err, "loc": ("body",)}
            for err in exc.errors(include_input=False)
        ]
        raise RequestValidationError(errors) from exc


def _with_param(exc: APIError, index: int) -> APIError:
    """Point the pipeline's early errors at the chat request field they are about."""
    if exc.param is None:
        if exc.code in _GUARDRAIL_CODES:
            exc.param = f"messages.{index}.content"
        elif exc.code in ("invalid_filters", "collection_forbidden"):
            exc.param = "rag.filters"
        elif exc.code == "unknown_model":
            exc.param = "model"
        elif exc.code == "refresh_forbidden":
            exc.param = "rag.cache"
        elif exc.code in _HISTORY_CODES:
            exc.param = "messages"
    return exc


# --- response --------------------------------------------------------------------------------


class _Completion:
    """The ids and the model shared by every chunk (or the one object) of a response."""

    def __init__(self, rid: str, meta: Meta) -> None:
        self.id = f"chatcmpl-{rid}"
        self.created = int(time.time())
        self.model = meta.route.model  # the concrete model that answered, as OpenAI reports it

    def obj(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **fields}


def _usage(done: Done) -> dict[str, int]:
    """What this request spent (zero on a cache hit: rag.saved says what the original cost)."""
    usage = done.usage
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def _rag(event: Meta | Done) -> dict[str, Any]:
    """The payload of /rag/stream's `meta` or `done` event, so the extra field reads like those events."""
    return event_payload(event)[1]


def _data(payload: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(payload, ensure_ascii=False))


def _stream_error(code: str, message: str) -> ServerSentEvent:
    """OpenAI's mid-stream failure: an error object as a data line, then the stream ends."""
    return _data(openai_error(500, code, message))


async def _chunks(
    completion: _Completion, events: AsyncIterator[Event], include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    """meta, token…, done (or error) as chat.completion.chunk data lines, then [DONE]."""
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, str], finish: str | None = None, **more: Any) -> ServerSentEvent:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _data(completion.obj("chat.completion.chunk", choices=[choice], **extra, **more))

    done: Done | None = None
    async for event in events:
        if isinstance(event, Meta):
            yield chunk({"role": "assistant", "content": ""}, rag=_rag(event))
        elif isinstance(event, Token):
            yield chunk({"content": event.text})
        elif isinstance(event, Done):
            done = event
        else:
            yield _stream_error(event.code, event.message)
            return
    if done is None:
        yield _stream_error("generation_failed", "the answer ended without completing")
        return
    yield chunk({}, "stop", rag=_rag(done))
    if include_usage:
        yield _data(completion.obj("chat.completion.chunk", choices=[], usage=_usage(done)))
    yield ServerSentEvent(data="[DONE]")


# --- endpoints --------------------------------------------------------------------------------


@router.post(
    "/chat/completions",
    response_model=None,
    responses={
        200: {
            "description": "A `chat.completion` object, or with `stream: true` its `chat.completion.chunk` stream",
            "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
        },
        **error_responses(*ANSWER, 502, openai=True),
    },
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response | dict[str, Any]:
    """The RAG answer to the last user message, as an OpenAI chat completion (or its chunk stream)."""
    rid = request_id(request)
    rag_request, index = to_rag_request(body)
    try:
        first, events = await answer_events(request, rag_request)
    except ServiceError as exc:
        raise _with_param(api_error(exc), index) from None
    assert isinstance(first, Meta)
    completion = _Completion(rid, first)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        if first.cache in ("hit", "semantic_hit"):  # complete already: one body, no streaming machinery
            body_bytes = b"".join([sse.encode() async for sse in _chunks(completion, events, include_usage)])
            return Response(body_bytes, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
        failure = _stream_error("internal_error", "the answer stream failed unexpectedly")
        return sse_response(_chunks(completion, events, include_usage), rid, failure)

    answer, done = await collect(events)
    message = {"role": "assistant", "content": answer, "refusal": None}
    return completion.obj(
        "chat.completion",
        choices=[{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        usage=_usage(done),
        rag={**_rag(first), **_rag(done)},
    )


def _models(request: Request) -> dict[str, dict[str, Any]]:
    """auto, the tiers, then every configured model (first provider wins a shared name)."""
    service: AnswerService = request.app.state.resources.answers
    owners = {name: OWNER for name in ("auto", "small", "large")}
    for choice in service.policy.choices():
        owners.setdefault(choice.model, choice.provider)
    # created is required by the format; these models have no creation date, so 0.
    return {name: {"id": name, "object": "model", "created": 0, "owned_by": owner} for name, owner in owners.items()}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """What `model` accepts: auto, small, large and the configured models, in OpenAI's list format."""
    return {"object": "list", "data": list(_models(request).values())}


@router.get("/models/{model_id:path}", responses=error_responses(404, 422, openai=True))
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    models = _models(request)
    if model_id not in models:
        raise APIError(404, "model_not_found", "no such model; GET /v1/models lists them", param="model")
    return models[model_id]
