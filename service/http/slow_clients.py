"""A header deadline for uvicorn's HTTP protocols: slow clients (slowloris) get closed.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) and bounds the size of
headers, but not the time a client takes to send them: a connection sending one header byte
every few seconds stays open for ever, and enough of them exhaust the worker's connections
(`limit_concurrency`) or file descriptors. Here every connection gets
RAG_HTTP_HEADER_TIMEOUT_S to complete a request's headers, counted from connecting and,
on a kept-alive connection, from the first byte of each next request; then it is closed.
The body and the response are not limited (streams last as long as answers do). A reverse
proxy with its own header and body timeouts still belongs in front (docs/operations.md).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings


class _HeaderDeadline:
    """Mixin for uvicorn's H11Protocol / HttpToolsProtocol (both set `self.cycle` once a
    request's headers are complete)."""

    # None: read RAG_HTTP_HEADER_TIMEOUT_S (in each worker process) on first use.
    header_timeout_s: ClassVar[float | None] = None

    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    _header_timer: asyncio.TimerHandle | None = None
    _armed_cycle: Any = None

    @classmethod
    def _timeout(cls) -> float:
        if cls.header_timeout_s is None:
            cls.header_timeout_s = Settings().http_header_timeout_s
        return cls.header_timeout_s

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)  # type: ignore[misc]
        if self._header_timer is not None and self.cycle is not self._armed_cycle:
            self._disarm()  # a new request's headers are complete

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._armed_cycle = self.cycle
        self._header_timer = self.loop.call_later(self._timeout(), self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is self._armed_cycle and not self.transport.is_closing():
            self.transport.close()


class GuardedH11Protocol(_HeaderDeadline, H11Protocol):
    pass


def protocol_class() -> type[asyncio.Protocol]:
    """uvicorn's fastest available HTTP/1.1 implementation, with the header deadline."""
    try:
        from service.http._httptools_guarded import GuardedHttpToolsProtocol
    except ImportError:  # httptools is optional in uvicorn
        return GuardedH11Protocol
    return GuardedHttpToolsProtocol
