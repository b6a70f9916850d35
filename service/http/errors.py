"""One error shape for every failure before a stream starts: {"error": {"code", "message"}}.

`APIError` is the HTTP error type, built only in service/http/. The domain below raises
`ServiceError`s (service/errors.py); `api_error` here is the one place that maps each to a
status code, error code, message and `Retry-After`.

Under `/v1/` (the OpenAI-compatible API) the same errors carry OpenAI's keys as well,
`{"error": {"message", "type", "param", "code"}}`, so the OpenAI SDKs raise their usual
exception classes and show our message and code.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (
    DependencyUnavailable,
    Forbidden,
    GuardrailViolation,
    HistoryTooLarge,
    HistoryViolation,
    InvalidRequest,
    Overloaded,
    RateLimited,
    ServiceError,
)
from service.observability.logs import note

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.param = param  # the request field at fault; only the OpenAI shape shows it


# Most specific class first: the first match gives the status.
_STATUS: tuple[tuple[type[ServiceError], int], ...] = (
    (GuardrailViolation, 400),
    (HistoryTooLarge, 413),
    (HistoryViolation, 400),
    (InvalidRequest, 422),
    (Forbidden, 403),
    (RateLimited, 429),  # and BudgetExceeded; too_many_inflight
    (DependencyUnavailable, 503),  # database, embedding, providers, key look-ups (AuthUnavailable), a leader
    (Overloaded, 503),  # and AdmissionRefused; PoolExhausted: a worker's Redis pool had no free connection in time
)


def api_error(exc: ServiceError) -> APIError:
    """The HTTP error for a domain error: status by its class, its code and message, `Retry-After`."""
    status = next((status for cls, status in _STATUS if isinstance(exc, cls)), 500)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return APIError(status, exc.code, exc.message, headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


OPENAI_PREFIX = "/v1/"


def openai_error_type(status: int) -> str:
    """OpenAI's `error.type` for a status; its SDKs pick the exception class by status alone."""
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"  # 400, 401 (as OpenAI does for bad keys), 404, 413, 422


def openai_error(status: int, code: str, message: str, param: str | None = None) -> dict[str, dict[str, str | None]]:
    """SPEC's `code` and `message`, plus OpenAI's `type` and `param`."""
    return {"error": {"message": message, "type": openai_error_type(status), "param": param, "code": code}}


def _respond(request: Request, error: APIError) -> JSONResponse:
    note(error=error.code)  # for the access line
    if request.url.path.startswith(OPENAI_PREFIX):
        body = openai_error(error.status, error.code, error.message, error.param)
        return JSONResponse(body, status_code=error.status, headers=error.headers)
    return error_response(error.status, error.code, error.message, error.headers)


# A location's parts are field names, list indexes and union tags (`list[str]`), or a key the
# caller wrote (an unknown field, a dict key): shown only when short and plain, else `*`.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\[\]-]{1,64}")


def _loc_part(part: str | int) -> str:
    text = str(part)
    return text if isinstance(part, int) or _PLAIN_KEY.fullmatch(text) else "*"


_HTTP_CODES = {
    400: "invalid_request",  # FastAPI's "There was an error parsing the body": bad UTF-8, nesting too deep
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _respond(request, exc)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _respond(request, api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Say where and what, never echo the input back (it may carry user text).
        fields = [".".join(_loc_part(p) for p in err["loc"] if p != "body") or "body" for err in exc.errors()]
        problems = [f"{where}: {err['msg']}" for where, err in zip(fields, exc.errors(), strict=True)]
        resources = getattr(request.app.state, "resources", None)
        if resources is not None:  # counted like every other rejection (stage "schema")
            await resources.metrics.failed(code="invalid_request", stage="schema")
        error = APIError(422, "invalid_request", "; ".join(problems[:5]), param=fields[0] if fields else None)
        return _respond(request, error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error: %s", type(exc).__name__)
        return _respond(request, APIError(500, "internal_error", "an unexpected error occurred; it has been logged"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return _respond(request, APIError(exc.status_code, code, str(exc.detail), dict(exc.headers or {})))
