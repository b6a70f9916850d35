"""ASGI middleware: request ids on every response and log line, the access log, and the request body size limit."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import bound_contextvars

from service.http.errors import OPENAI_PREFIX, openai_error
from service.observability.logs import ACCESS_LOGGER, access_record, note

access_log = logging.getLogger(ACCESS_LOGGER)
_RECORD_ATTRIBUTES = {*vars(logging.makeLogRecord({})), "message", "asctime"}  # `extra` must not overwrite these

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class _HTTPMiddleware:
    """Passes anything but HTTP (lifespan, websockets) straight through; `http` handles the rest."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class RequestID(_HTTPMiddleware):
    """Accept a sane X-Request-ID or make one; expose it as `request.state.request_id` and echo it."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", request_id.encode())]
            await send(message)

        with bound_contextvars(request_id=request_id):  # on every log line written for this request
            await self.app(scope, receive, send_with_id)


class AccessLog(_HTTPMiddleware):
    """One `service.access` line per request, written when the response has ended (an SSE stream too).

    The line carries what `service.observability.logs.note()` collected on the way (cache outcome, route, usage,
    question hash and length, error code) and the caller's key id; never a key, a header or user text.
    """

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status: int | None = None
        finished = False
        gone = False

        async def watching_receive() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or (message["type"] == "http.disconnect" and not finished)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        with access_record() as record:
            try:
                await self.app(scope, watching_receive, watching_send)
            except BaseException:
                if status is None:  # what the server will answer
                    status = 500
                    record.setdefault("error", "internal_error")
                raise
            finally:
                state = scope.get("state", {})
                principal = state.get("principal")
                fields: dict[str, Any] = {
                    "request_id": state.get("request_id"),
                    "method": scope.get("method"),
                    "path": str(scope.get("path", ""))[:200],
                    "status": status,
                    "key_id": getattr(principal, "key_id", None),
                    "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                    **{k: v for k, v in record.items() if k not in _RECORD_ATTRIBUTES},
                }
                if gone:
                    fields["client_disconnected"] = True
                access_log.info("request", extra=fields)


class BodySizeLimit(_HTTPMiddleware):
    """413 for bodies over the limit, by Content-Length or by counting a streamed body."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(scope, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        code, message = "request_too_large", f"request body exceeds {self.max_bytes} bytes"
        note(error=code)
        if str(scope.get("path", "")).startswith(OPENAI_PREFIX):  # the OpenAI-compatible API's error shape
            payload: dict[str, Any] = openai_error(413, code, message)
        else:
            payload = {"error": {"code": code, "message": message}}
        body = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(BaseException):
    """Not an Exception: FastAPI turns any Exception raised while it reads the body into a 400
    ("There was an error parsing the body"), so a chunked body over the limit got that instead of 413."""
