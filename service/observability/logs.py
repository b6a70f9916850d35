"""Structured logs: one JSON object per line (or a console rendering), and the per-request access record.

`configure_logging` routes every stdlib logger through structlog's `ProcessorFormatter`, so the
plain `logging.getLogger(__name__)` calls across the code base, uvicorn's own messages and
anything structlog-native all come out in one format, each with the contextvars bound for the
request (`request_id`, bound by the `RequestID` middleware).

The access line (`service.http.middleware.AccessLog`) is filled in by whoever knows a field: the
middleware (method, path, status, latency), the auth dependency (key id), the pipeline (cache
outcome, route, usage, question hash and length) and the error handlers (error code), through
`note()`. The record is one mutable dict per request held in a ContextVar, so code running in
tasks started by the request (the SSE body, the generation producer) adds to the same record.

What never reaches a log line: question text, answers, API keys, Authorization headers and
provider keys. The code logs ids, hashes, counts and exception type names; as a safety net,
exception messages are dropped from tracebacks (asyncpg's and pydantic's can quote the values
they were given) and strings that look like credentials are masked.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import IO, Any, Literal

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LogFormat = Literal["json", "console"]

ACCESS_LOGGER = "service.access"
# Loggers that log at the configured level; everything else (SDKs, httpx, asyncio) only from WARNING,
# so RAG_LOG_LEVEL=debug never turns on an SDK's request dumps, which would carry prompts.
OWN_LOGGERS = ("service", "ingest", "uvicorn")

_access: ContextVar[dict[str, Any] | None] = ContextVar("ragcache_access", default=None)
_handler: logging.Handler | None = None  # the one handler configure_logging installed on the root logger


# --- the access record --------------------------------------------------------------------


def note(**fields: Any) -> None:
    """Add fields to the current request's access line; does nothing outside a request."""
    record = _access.get()
    if record is not None:
        record.update(fields)


@contextmanager
def access_record() -> Iterator[dict[str, Any]]:
    """A fresh record for one request, visible to `note()` here and in tasks started inside."""
    record: dict[str, Any] = {}
    token = _access.set(record)
    try:
        yield record
    finally:
        _access.reset(token)


# --- processors ---------------------------------------------------------------------------

REDACTED = "[REDACTED]"
# Fields that must never carry a value, whoever logs them.
SECRET_FIELDS = frozenset({"authorization", "api_key", "password", "secret", "question", "answer", "prompt"})
_SECRETS = (
    (re.compile(r"\b(rck_[a-z0-9]{12}_)[A-Za-z0-9_-]+"), rf"\1{REDACTED}"),  # our keys: the id may show
    (re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+"), rf"\1{REDACTED}"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]+"), REDACTED),  # Anthropic (sk-ant-…) and OpenAI (sk-…) keys
)


def scrub(text: str) -> str:
    """`text` with anything shaped like an API key or bearer token masked."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Blank fields named like secrets or user text; mask credential-shaped strings in the rest."""
    for name, value in event_dict.items():
        if name.lower() in SECRET_FIELDS and value is not None:
            event_dict[name] = REDACTED
        elif isinstance(value, str):
            event_dict[name] = scrub(value)
    return event_dict


def drop_color_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """uvicorn passes its message again with terminal colour codes as `extra`; the plain one is enough."""
    event_dict.pop("color_message", None)
    return event_dict


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _exc_info(value: object) -> ExcInfo | None:
    if isinstance(value, BaseException):
        return type(value), value, value.__traceback__
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return value[0], value[1], value[2]
    if value is True:
        current = sys.exc_info()
        return current if current[1] is not None else None
    return None


def format_exception_without_messages(exc: BaseException) -> str:
    """A traceback (frames and exception types, causes included) without any exception's message."""
    chain: list[tuple[BaseException, str | None]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link: str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "The above exception was the direct cause of the following exception:"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "During handling of the above exception, another exception occurred:"
        else:
            current = None
    parts: list[str] = []
    for error, following in reversed(chain):
        kind = type(error)
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(error.__traceback__))
        parts.append(f"{kind.__module__}.{kind.__qualname__}\n")
        if following is not None:
            parts.append(f"\n{following}\n\n")
    return "".join(parts).rstrip("\n")


def exception_without_messages(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Render `exc_info` as `exc_type` and a message-free `exception` traceback.

    Runs before any renderer, so neither the JSON nor the console renderer (which would show
    local variables with rich) ever sees the exception object itself.
    """
    info = _exc_info(event_dict.pop("exc_info", None))
    if info is not None:
        event_dict["exc_type"] = info[0].__name__
        event_dict["exception"] = format_exception_without_messages(info[1])
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        exception_without_messages,
    ]


# --- configuration ------------------------------------------------------------------------


def _level(name: str) -> int:
    """RAG_LOG_LEVEL as a number; uvicorn's `trace` is below debug."""
    number = logging.getLevelName(name.upper())
    if isinstance(number, int):
        return number
    return 5 if name.lower() == "trace" else logging.INFO


def configure_logging(level: str, json: bool = True, *, stream: IO[str] | None = None) -> logging.Handler:
    """Every log line to `stream` (stderr) as JSON (or console text), at `level` for our own loggers.

    Idempotent: calling it again replaces the handler it installed before and leaves other
    handlers on the root logger alone. Returns the handler.
    """
    global _handler
    out = stream if stream is not None else sys.stderr
    renderer: Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.ExtraAdder(), drop_color_message],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redact_secrets, renderer],
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    _handler = handler
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(_level(level))
        for old in [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]:
            logger.removeHandler(old)  # uvicorn's default config, or an earlier setup: one handler, the root's
        logger.propagate = True
    return handler
