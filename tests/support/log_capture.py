"""Logging configured exactly as `rag-serve` does it, into a StringIO, and restored afterwards."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from service.observability.logs import (
    OWN_LOGGERS,
    configure_logging,
)


@contextmanager
def capturing(level: str = "info", *, json: bool = True) -> Iterator[io.StringIO]:
    """All log output, formatted as in production, into a StringIO; the logging setup is restored after."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in OWN_LOGGERS)]
    saved = [(logger, logger.level, list(logger.handlers), logger.propagate) for logger in loggers]
    saved_structlog = structlog.get_config()
    stream = io.StringIO()
    configure_logging(level, json=json, stream=stream)
    try:
        yield stream
    finally:
        for logger, old_level, handlers, propagate in saved:
            logger.setLevel(old_level)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        structlog.configure(**saved_structlog)
