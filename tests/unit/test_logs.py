"""Structured logs without a server: masking, tracebacks without messages, the console format."""

from __future__ import annotations

import json
import logging

import structlog

from service.observability.logs import (
    REDACTED,
    access_record,
    format_exception_without_messages,
    note,
    scrub,
)
from tests.support.log_capture import capturing

EMAIL = "jane.doe@example.com"
SECRET_QUESTION = "what is my password?"


def test_credentials_are_masked_and_secret_fields_blanked() -> None:
    key = "rck_abcdefghijkl_" + "s" * 43
    assert scrub(f"key {key} and Authorization: Bearer abc.def") == (
        f"key rck_abcdefghijkl_{REDACTED} and Authorization: Bearer {REDACTED}"
    )
    assert scrub("ANTHROPIC_API_KEY=sk-ant-api03-xyz OPENAI_API_KEY=sk-proj-123") == (
        f"ANTHROPIC_API_KEY={REDACTED} OPENAI_API_KEY={REDACTED}"
    )
    assert scrub("cache hit for 3f2a9c0d1e4b5a67 in 1.2 ms") == "cache hit for 3f2a9c0d1e4b5a67 in 1.2 ms"

    with capturing() as stream:
        log = logging.getLogger("service.test_logs")
        log.info("got %s", key, extra={"question": SECRET_QUESTION, "answer": None, "n": 3})
        row_error = f"duplicate key value: {EMAIL}"  # the kind of message asyncpg writes, quoting a value
        try:
            try:
                raise ValueError(row_error)
            except ValueError as exc:
                raise RuntimeError(SECRET_QUESTION) from exc
        except RuntimeError:
            log.exception("failed")
        structlog.get_logger("service.test_logs").warning("native", api_key="sk-live", tokens=5)
    first, failed, native = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == f"got rck_abcdefghijkl_{REDACTED}"
    assert (first["question"], first["answer"], first["n"]) == (REDACTED, None, 3)
    assert failed["exc_type"] == "RuntimeError" and "builtins.ValueError" in failed["exception"]
    assert "test_logs.py" in failed["exception"] and "direct cause" in failed["exception"]
    assert EMAIL not in stream.getvalue() and SECRET_QUESTION not in stream.getvalue()
    assert (native["api_key"], native["tokens"], native["level"]) == (REDACTED, 5, "warning")


def test_exception_traceback_keeps_frames_and_types_only() -> None:
    def fail(value: str) -> None:
        raise KeyError(value)

    try:
        fail(EMAIL)
    except KeyError as exc:
        rendered = format_exception_without_messages(exc)
    assert rendered.startswith("Traceback (most recent call last):") and rendered.endswith("builtins.KeyError")
    assert "in fail" in rendered and "raise KeyError(value)" in rendered and EMAIL not in rendered


def test_console_format_and_notes_outside_a_request() -> None:
    note(cache="hit")  # no request: nothing to add to, and no error
    with access_record() as record:
        note(cache="miss", question_chars=3)
        assert record == {"cache": "miss", "question_chars": 3}
    with capturing("warning", json=False) as stream:
        logging.getLogger("service.test_logs").info("quiet")  # below the level
        logging.getLogger("service.test_logs").warning("loud %d", 1, extra={"request_id": "r-1"})
    out = stream.getvalue()
    assert "quiet" not in out and "loud 1" in out and "request_id=r-1" in out and not out.lstrip().startswith("{")
