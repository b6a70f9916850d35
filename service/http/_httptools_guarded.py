"""The httptools flavour of `slow_clients.GuardedH11Protocol` (imported only when httptools is)."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.http.slow_clients import _HeaderDeadline


class GuardedHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
    pass
