"""Loopback stand-in for the Anthropic and OpenAI HTTP APIs.

Tests point the *real* ``anthropic`` / ``openai`` SDKs at this server with
``base_url`` (Anthropic: ``server.base_url``; OpenAI: ``server.base_url + "/v1"``)
so the service's provider code runs unmodified, over real sockets and the real
wire formats (SSE events, error bodies, retry headers), without the internet.

The server is a small HTTP/1.1 implementation on ``asyncio`` streams, run in its
own thread with its own event loop.  It is hand-rolled rather than built on an
ASGI stack because tests need two things ASGI hides: closing the TCP connection
in the middle of a chunked response (so clients see a truncated body, not a
clean end), and noticing the instant a client hangs up (EOF on the socket),
even while the handler is idle in a delay or a hang.

Per-request behaviour is scripted with :class:`Behavior` objects queued via
:meth:`ProviderServer.enqueue`; every request is recorded as a :class:`CallRecord`
in :attr:`ProviderServer.calls`, and :meth:`ProviderServer.wait_for` lets a test
block on a condition (a call started, finished, or its client disconnected)
without sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import math
import re
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any, Literal, NamedTuple, TypeVar

__all__ = [
    "Behavior",
    "CallRecord",
    "Provider",
    "ProviderServer",
    "Route",
    "default_answer",
    "embed_text",
    "split_words",
]

Provider = Literal["anthropic", "openai"]
Route = Literal["messages", "chat.completions", "embeddings", "models"]
T = TypeVar("T")

_ROUTES: dict[str, Route] = {
    "/v1/messages": "messages",
    "/v1/chat/completions": "chat.completions",
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
}
_DEFAULT_MODELS = ("claude-haiku-4-5", "claude-sonnet-4-5", "gpt-4o-mini", "text-embedding-3-small")
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_MAX_HEAD_BYTES = 64 * 1024
_MAX_BODY_BYTES = 64 * 1024 * 1024
_READ_SIZE = 65536

# Error "type" strings each provider puts in its JSON error body, by status.
_ANTHROPIC_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# OpenAI error bodies: status -> (type, code).
_OPENAI_ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
}
_DEFAULT_ERROR_MESSAGES: dict[int, str] = {
    429: "Rate limit exceeded (scripted by ProviderServer).",
    500: "Internal server error (scripted by ProviderServer).",
    503: "Service unavailable (scripted by ProviderServer).",
    529: "Overloaded",
}


def split_words(text: str) -> list[str]:
    """Split ``text`` into word tokens keeping whitespace, so ``"".join`` round-trips."""
    return re.findall(r"\s*\S+\s*", text) or ([text] if text else [])


def _content_text(content: Any) -> str:
    """Flatten a message ``content`` (string or list of content blocks) to text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and isinstance(block.get("text"), str):
                parts.append(block["text"])
        return "\n".join(parts)
    return ""


def _request_text(body: Mapping[str, Any]) -> str:
    """All prompt text of a Messages or Chat Completions request (system included)."""
    parts = [_content_text(body.get("system"))]
    messages = body.get("messages")
    if isinstance(messages, list):
        parts.extend(_content_text(m.get("content")) for m in messages if isinstance(m, Mapping))
    return "\n".join(p for p in parts if p)


def default_answer(body: Mapping[str, Any]) -> str:
    """Deterministic answer for a chat request: quotes the question and cites ``[1]``.

    The quoted part is the last non-empty line of the last user message (the
    question, in a typical RAG prompt), whitespace-collapsed and capped at 12
    words, so tests can check that the prompt actually reached the provider.
    """
    question = ""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, Mapping) and message.get("role") == "user":
                lines = [ln.strip() for ln in _content_text(message.get("content")).splitlines()]
                lines = [ln for ln in lines if ln]
                question = lines[-1] if lines else ""
                break
    words = question.split()
    quoted = " ".join(words[:12]) + (" …" if len(words) > 12 else "")
    return f'Based on the sources, the answer to "{quoted}" is in the first passage [1].'


def embed_text(text: str, dim: int) -> list[float]:
    """Deterministic unit vector for ``text``: SHA-256 counter-mode bytes mapped to [-1, 1]."""
    values: list[float] = []
    for counter in itertools.count():
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        for (word,) in struct.iter_unpack(">I", digest):
            values.append(word / 2**31 - 1.0)
        if len(values) >= dim:
            break
    values = values[:dim]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


@dataclass
class Behavior:
    """How the server answers one request (routing: see :class:`ProviderServer`).

    ``status``: 200, or an error status (429/500/503/529/...) answered with the
    provider's own error body; ``retry_after`` (seconds, may be fractional) adds
    ``retry-after`` and ``retry-after-ms`` headers, which both SDKs honour in
    preference to their own backoff; ``should_retry`` adds ``x-should-retry``,
    which overrides the SDKs' status-based retry decision.

    ``text`` is the answer (a string, a function of the parsed request body, or
    ``None`` for :func:`default_answer`); ``chunks`` gives the exact token pieces
    instead, else ``tokenizer`` splits the text.  ``first_token_delay`` delays
    the first text event (headers and preamble events go out at once, like the
    real APIs); ``token_interval`` spaces the rest.  A non-streaming request is
    answered after the time the stream would have taken.

    ``drop_after=N`` closes the TCP connection after N text events without
    finishing the chunked body (``drop_mode="reset"`` sends a RST instead of a
    FIN); a non-streaming or error response is cut after half its body.
    ``error_after=N`` instead sends the provider's in-stream error event after
    N text events and ends the stream cleanly.  ``hang`` sends nothing at all
    until the client goes away.  ``input_tokens`` / ``output_tokens`` override
    the reported usage (default: words of the prompt / number of text events).
    """

    status: int = 200
    text: str | Callable[[Mapping[str, Any]], str] | None = None
    chunks: Sequence[str] | None = None
    tokenizer: Callable[[str], list[str]] = split_words
    first_token_delay: float = 0.0
    token_interval: float = 0.0
    drop_after: int | None = None
    drop_mode: Literal["close", "reset"] = "close"
    error_after: int | None = None
    hang: bool = False
    input_tokens: int | None = None
    output_tokens: int | None = None
    stop_reason: str | None = None
    honor_max_tokens: bool = True
    retry_after: float | None = None
    should_retry: bool | None = None
    error_type: str | None = None
    error_message: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class CallRecord:
    """One request the server received, and what happened to it.

    Times are ``time.monotonic()`` values of this process, so tests can compare
    them with their own clock.  The server thread mutates a record while the
    request runs, always *before* handing the matching bytes to the socket: by
    the time the client has seen headers, a token or the end of the response,
    ``status`` / ``tokens_sent`` / ``completed`` already say so.  ``completed``
    means the whole HTTP response was written (an in-stream ``error_after``
    event counts); ``dropped`` that the server cut it on purpose;
    ``disconnected_at`` that the client left first.  ``finished_at`` (``done``)
    is set last, once the server has stopped working on the request.
    """

    index: int
    provider: Provider
    route: Route | None
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    behavior: Behavior
    started_at: float
    stream: bool = False
    status: int | None = None
    text: str = ""
    headers_sent_at: float | None = None
    first_token_at: float | None = None
    tokens_sent: int = 0
    finished_at: float | None = None
    completed: bool = False
    dropped: bool = False
    disconnected_at: float | None = None

    @property
    def disconnected(self) -> bool:
        """Whether the client went away before the response was complete."""
        return self.disconnected_at is not None

    @property
    def done(self) -> bool:
        """Whether the server has stopped working on this request, for any reason."""
        return self.finished_at is not None


class _ClientGone(Exception):
    """Raised inside a handler when the client has closed the connection."""


class _Dropped(Exception):
    """Raised inside a handler after it deliberately cut the connection."""


class _BadRequest(Exception):
    """The bytes on the wire were not an HTTP/1.1 request we can parse."""


@dataclass
class _Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class _Connection:
    """One client TCP connection: buffered reading, writing, and hang-up detection.

    While a response is being produced a watcher task keeps reading the socket;
    EOF or a reset means the client is gone, which sets :attr:`gone` at once, so
    delays and hangs can wake up instead of discovering it on the next write.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.gone = asyncio.Event()
        self.on_gone: Callable[[], None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def _fill(self) -> bool:
        data = await self.reader.read(_READ_SIZE)
        if not data:
            return False
        self.buffer += data
        return True

    async def read_request(self) -> _Request | None:
        """Read one request; ``None`` on a clean EOF between requests."""
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > _MAX_HEAD_BYTES:
                raise _BadRequest("request head too large")
            if not await self._fill():
                if self.buffer:
                    raise _BadRequest("connection closed inside request head")
                return None
        head_end = self.buffer.index(b"\r\n\r\n")
        head = bytes(self.buffer[:head_end]).decode("latin-1")
        del self.buffer[: head_end + 4]
        request_line, *header_lines = head.split("\r\n")
        try:
            method, target, version = request_line.split(" ", 2)
        except ValueError as exc:
            raise _BadRequest(f"bad request line {request_line!r}") from exc
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(f"bad header line {line!r}")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked()
        else:
            length = int(headers.get("content-length", "0") or "0")
            if length > _MAX_BODY_BYTES:
                raise _BadRequest("request body too large")
            body = await self._read_exact(length)
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
        return _Request(method.upper(), target, headers, body, keep_alive)

    async def _read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self._fill():
                raise _BadRequest("connection closed inside request body")
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def _read_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not await self._fill():
                raise _BadRequest("connection closed inside chunked body")
        end = self.buffer.index(b"\r\n")
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int((await self._read_line()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while await self._read_line():  # trailers, up to the blank line
                    pass
                return bytes(body)
            body += await self._read_exact(size)
            await self._read_line()
            if len(body) > _MAX_BODY_BYTES:
                raise _BadRequest("request body too large")

    def start_watching(self) -> None:
        """Watch the socket for EOF/reset while a response is in progress."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch(self) -> None:
        try:
            while await self._fill():  # bytes of a pipelined next request: keep them
                pass
        except (ConnectionError, OSError):
            pass
        self.mark_gone()

    def mark_gone(self) -> None:
        if not self.gone.is_set():
            self.gone.set()
            if self.on_gone is not None:
                self.on_gone()

    async def sleep(self, seconds: float) -> None:
        """Sleep, but raise :class:`_ClientGone` as soon as the client hangs up."""
        if self.gone.is_set():
            raise _ClientGone
        if seconds <= 0:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.gone.wait(), timeout=seconds)
        if self.gone.is_set():
            raise _ClientGone

    async def write(self, data: bytes) -> None:
        if self.gone.is_set() or self.writer.is_closing():
            raise _ClientGone
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self.mark_gone()
            raise _ClientGone from exc

    def abort(self, mode: Literal["close", "reset"]) -> None:
        """Cut the connection without ending the HTTP message."""
        if mode == "reset":
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()
        else:
            self.writer.close()


class _Exchange:
    """Writes one HTTP response on a connection and keeps its CallRecord current."""

    def __init__(self, server: ProviderServer, conn: _Connection, record: CallRecord) -> None:
        self.server = server
        self.conn = conn
        self.record = record
        self.keep_alive = True

    def _head(self, status: int, headers: Mapping[str, str]) -> bytes:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:  # e.g. Anthropic's 529
            reason = "Error"
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if not self.keep_alive:
            lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _base_headers(self, content_type: str) -> dict[str, str]:
        rid = f"req_fixture_{self.record.index:06d}"
        headers = {
            "content-type": content_type,
            "date": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()),
        }
        headers["request-id" if self.record.provider == "anthropic" else "x-request-id"] = rid
        headers.update(self.record.behavior.headers)
        return headers

    # The record is updated *before* bytes are handed to the socket: once the
    # client has seen something, a test reading the record must see it too.

    async def _write_final(self, data: bytes) -> None:
        """Write the last bytes of the response, marking the call completed."""
        self.server._update(self.record, completed=True)
        try:
            await self.conn.write(data)
        except _ClientGone:
            self.server._update(self.record, completed=False)
            raise

    async def send_json(self, status: int, payload: Any, extra: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        headers = self._base_headers("application/json")
        headers.update(extra or {})
        headers["content-length"] = str(len(body))
        self.server._update(self.record, status=status, headers_sent_at=time.monotonic())
        if self.record.behavior.drop_after is not None:
            # Promise the whole body, deliver half of it, then cut the connection.
            await self.conn.write(self._head(status, headers) + body[: len(body) // 2])
            raise _Dropped
        await self._write_final(self._head(status, headers) + body)

    async def start_stream(self) -> None:
        headers = self._base_headers("text/event-stream; charset=utf-8")
        headers.update({"cache-control": "no-cache", "transfer-encoding": "chunked"})
        self.server._update(self.record, status=200, headers_sent_at=time.monotonic())
        await self.conn.write(self._head(200, headers))

    async def send_chunk(self, data: bytes) -> None:
        await self.conn.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    async def end_stream(self) -> None:
        await self._write_final(b"0\r\n\r\n")

    async def token_gate(self, index: int) -> None:
        """Before text event ``index``: apply delays, and drop if scripted."""
        behavior = self.record.behavior
        if behavior.drop_after is not None and index >= behavior.drop_after:
            raise _Dropped
        await self.conn.sleep(behavior.first_token_delay if index == 0 else behavior.token_interval)

    def token_sent(self) -> None:
        now = time.monotonic()
        first = self.record.first_token_at if self.record.first_token_at is not None else now
        self.server._update(self.record, tokens_sent=self.record.tokens_sent + 1, first_token_at=first)

    async def error_response(self, status: int) -> None:
        behavior = self.record.behavior
        provider = self.record.provider
        message = behavior.error_message or _DEFAULT_ERROR_MESSAGES.get(status) or f"Error {status}"
        payload: dict[str, Any]
        if provider == "anthropic":
            etype = behavior.error_type or _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
            payload = {
                "type": "error",
                "error": {"type": etype, "message": message},
                "request_id": f"req_fixture_{self.record.index:06d}",
            }
        else:
            otype, code = _OPENAI_ERROR_TYPES.get(status, ("server_error", None))
            error = {"message": message, "type": behavior.error_type or otype, "param": None, "code": code}
            payload = {"error": error}
        extra: dict[str, str] = {}
        if behavior.retry_after is not None:
            seconds = behavior.retry_after
            extra["retry-after"] = str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
            extra["retry-after-ms"] = str(round(seconds * 1000))
        if behavior.should_retry is not None:
            extra["x-should-retry"] = "true" if behavior.should_retry else "false"
        await self.send_json(status, payload, extra)


class _Reply(NamedTuple):
    """A streamed generation: its id, the model it names, the text pieces, the stop reason."""

    ident: str
    model: str
    pieces: Sequence[str]
    stop: str


class _Locked:
    """A Behavior attribute of ProviderServer read and written under its lock (kept in `_<name>`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute = f"_{name}"

    def __get__(self, server: ProviderServer, owner: type | None = None) -> Behavior:
        with server._cond:
            behavior: Behavior = getattr(server, self.attribute)
            return behavior

    def __set__(self, server: ProviderServer, behavior: Behavior) -> None:
        with server._cond:
            setattr(server, self.attribute, behavior)


class ProviderServer:
    """Fake Anthropic + OpenAI endpoint on 127.0.0.1, served from a background thread.

    Routing of scripted behaviours: :meth:`enqueue` entries without a ``route``
    apply to the next *generation* request (``messages`` or
    ``chat.completions``); entries with a ``route`` only to that route.  With no
    matching entry, generation requests use :attr:`default` and embeddings /
    models use :attr:`service_default` (plain success unless changed).
    """

    def __init__(
        self,
        *,
        embedding_dim: int = 1536,
        default: Behavior | None = None,
        models: Sequence[str] = _DEFAULT_MODELS,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.models = list(models)
        self._default = default or Behavior()
        self._service_default = Behavior()
        self._cond = threading.Condition()  # RLock inside: predicates may read `calls`
        self._queue: list[tuple[Route | None, Behavior]] = []
        self._calls: list[CallRecord] = []
        self._counter = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._port: int | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> ProviderServer:
        """Bind a free port and start serving; returns self once it accepts connections."""
        if self._thread is not None:
            raise RuntimeError("ProviderServer already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
                self._port = int(self._server.sockets[0].getsockname()[1])
            except BaseException as exc:  # report startup failures to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="ProviderServer", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            self._thread = None
            raise RuntimeError("ProviderServer failed to start") from (failure[0] if failure else None)
        return self

    def stop(self) -> None:
        """Close the listener and all open connections, then end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        if thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        self._loop = self._thread = self._server = None
        self._port = None

    def __enter__(self) -> ProviderServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ProviderServer is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """Root URL; the OpenAI SDK wants ``base_url + "/v1"``, Anthropic this as is."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    # ------------------------------------------------------------------ scripting
    default = _Locked()  # for generation requests when no queued entry matches
    service_default = _Locked()  # for embeddings/models requests when no queued entry matches

    def enqueue(self, *behaviors: Behavior, route: Route | None = None) -> None:
        """Queue behaviours for upcoming requests, consumed in order (see class doc)."""
        with self._cond:
            self._queue.extend((route, b) for b in behaviors)

    @property
    def pending(self) -> int:
        """Number of queued behaviours not yet consumed."""
        with self._cond:
            return len(self._queue)

    def reset(self) -> None:
        """Forget queued behaviours and recorded calls; restore the defaults."""
        with self._cond:
            self._queue.clear()
            self._calls.clear()
            self._default = Behavior()
            self._service_default = Behavior()
            self._cond.notify_all()

    def _next_behavior(self, route: Route | None) -> Behavior:
        generation = route in ("messages", "chat.completions")
        with self._cond:
            for i, (wanted, behavior) in enumerate(self._queue):
                if wanted == route or (wanted is None and generation):
                    del self._queue[i]
                    return behavior
            return self._default if generation else self._service_default

    # ------------------------------------------------------------------ recording
    @property
    def calls(self) -> list[CallRecord]:
        """Snapshot of all recorded calls, oldest first."""
        with self._cond:
            return list(self._calls)

    def calls_to(self, route: Route) -> list[CallRecord]:
        """Recorded calls for one route, oldest first."""
        with self._cond:
            return [c for c in self._calls if c.route == route]

    @property
    def last_call(self) -> CallRecord:
        with self._cond:
            if not self._calls:
                raise LookupError("no calls recorded")
            return self._calls[-1]

    @property
    def open_connections(self) -> int:
        """Client TCP connections currently open, idle keep-alive ones included."""
        return len(self._tasks)  # one handler task per connection, for as long as it is open

    def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:
        """Block until ``predicate()`` is truthy or ``timeout`` passes; return its last value.

        The predicate is re-checked whenever a call starts, sends a token,
        finishes or disconnects, so no polling or sleeping is needed.  Calling
        this from an event loop blocks that loop: use :meth:`async_wait_for` if
        the loop must keep running (e.g. the client under test lives on it).
        """
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    async def async_wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 5.0,  # noqa: ASYNC109 - bounds a blocking wait in a worker thread
    ) -> T:
        """:meth:`wait_for` without blocking the caller's event loop."""
        return await asyncio.to_thread(self.wait_for, predicate, timeout)

    def _update(self, record: CallRecord, **changes: Any) -> None:
        with self._cond:
            for name, value in changes.items():
                setattr(record, name, value)
            self._cond.notify_all()

    # ------------------------------------------------------------------- serving
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Connection(reader, writer)
        try:
            while True:
                try:
                    request = await conn.read_request()
                except _BadRequest:
                    with contextlib.suppress(_ClientGone):
                        await conn.write(_BAD_REQUEST)
                    break
                if request is None:
                    break
                if not await self._serve(conn, request):
                    break
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, conn: _Connection, request: _Request) -> bool:
        """Answer one request; returns whether the connection can be reused."""
        path = request.target.split("?", 1)[0].rstrip("/")
        route = _ROUTES.get(path)
        provider: Provider = (
            "anthropic"
            if route == "messages" or (route != "chat.completions" and "anthropic-version" in request.headers)
            else "openai"
        )
        try:
            body: Any = json.loads(request.body) if request.body else None
        except ValueError:
            body = None
        behavior = self._next_behavior(route)
        record = CallRecord(
            index=next(self._counter),
            provider=provider,
            route=route,
            method=request.method,
            path=path,
            headers=dict(request.headers),
            body=body,
            behavior=behavior,
            started_at=time.monotonic(),
            stream=bool(isinstance(body, Mapping) and body.get("stream")),
        )
        with self._cond:
            self._calls.append(record)
            self._cond.notify_all()

        def on_gone() -> None:
            if not record.completed and record.disconnected_at is None:
                self._update(record, disconnected_at=time.monotonic())

        conn.on_gone = on_gone
        exchange = _Exchange(self, conn, record)
        exchange.keep_alive = request.keep_alive
        conn.start_watching()
        reusable = False
        try:
            await self._respond(exchange, route, request.method, body)
            reusable = request.keep_alive
        except _Dropped:
            self._update(record, dropped=True)
            conn.abort(behavior.drop_mode)
        except _ClientGone:
            on_gone()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the fixture: tell the client, then give up
            if record.headers_sent_at is None:
                detail = json.dumps({"error": {"message": f"ProviderServer bug: {exc!r}"}}).encode()
                head = (
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(detail)}\r\nconnection: close\r\n\r\n"
                )
                with contextlib.suppress(_ClientGone):
                    await conn.write(head.encode() + detail)
        finally:
            conn.on_gone = None
            await conn.stop_watching()
            self._update(record, finished_at=time.monotonic())
        return reusable and not conn.gone.is_set()

    async def _respond(self, ex: _Exchange, route: Route | None, method: str, body: Any) -> None:
        behavior = ex.record.behavior
        if behavior.hang:
            await ex.conn.gone.wait()
            raise _ClientGone
        if route is None or (route == "models") != (method == "GET") or method not in ("GET", "POST"):
            await ex.error_response(404 if route is None else 405)
            return
        if behavior.status != 200:
            await ex.conn.sleep(behavior.first_token_delay)
            await ex.error_response(behavior.status)
            return
        if route == "models":
            await ex.conn.sleep(behavior.first_token_delay)
            await ex.send_json(200, self._models_payload(ex.record.provider))
            return
        if not isinstance(body, Mapping):
            await ex.error_response(400)
            return
        if route == "embeddings":
            await ex.conn.sleep(behavior.first_token_delay)
            await ex.send_json(200, self._embeddings_payload(body))
            return
        await self._generate(ex, route, body)

    def _models_payload(self, provider: Provider) -> dict[str, Any]:
        if provider == "anthropic":
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in self.models
            ]
            return {"data": data, "has_more": False, "first_id": self.models[0], "last_id": self.models[-1]}
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 1735689600, "owned_by": "fixture"} for m in self.models],
        }

    def _embeddings_payload(self, body: Mapping[str, Any]) -> dict[str, Any]:
        raw = body.get("input")
        inputs: list[Any]
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            inputs = [raw]  # one string, or one pre-tokenised input
        else:
            inputs = list(raw) if isinstance(raw, list) else [raw]
        dim = body.get("dimensions") or self.embedding_dim
        as_base64 = body.get("encoding_format") == "base64"
        data: list[dict[str, Any]] = []
        tokens = 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else json.dumps(item)
            tokens += len(item) if isinstance(item, list) else max(1, len(text.split()))
            vector = embed_text(text, int(dim))
            encoded: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        model = body.get("model", "text-embedding-3-small")
        return {"object": "list", "data": data, "model": model, "usage": usage}

    async def _generate(self, ex: _Exchange, route: Route, body: Mapping[str, Any]) -> None:
        behavior = ex.record.behavior
        text = behavior.text(body) if callable(behavior.text) else behavior.text
        if text is None:
            text = default_answer(body)
        pieces = list(behavior.chunks) if behavior.chunks is not None else behavior.tokenizer(text)
        truncated = False
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if behavior.honor_max_tokens and isinstance(limit, int) and 0 < limit < len(pieces):
            pieces, truncated = pieces[:limit], True
        answer = "".join(pieces)
        ex.server._update(ex.record, text=answer)
        input_tokens = behavior.input_tokens
        if input_tokens is None:
            input_tokens = max(1, len(_request_text(body).split()))
        output_tokens = behavior.output_tokens if behavior.output_tokens is not None else len(pieces)
        model = str(body.get("model", "fixture-model"))
        anthropic = route == "messages"
        if anthropic:
            stop = behavior.stop_reason or ("max_tokens" if truncated else "end_turn")
        else:
            stop = behavior.stop_reason or ("length" if truncated else "stop")
        usage = (
            {"input_tokens": input_tokens, "output_tokens": output_tokens}
            if anthropic
            else {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            }
        )
        ident = f"{'msg_' if anthropic else 'chatcmpl-'}fixture{ex.record.index:012d}"

        if not ex.record.stream:
            generation_time = behavior.first_token_delay + behavior.token_interval * max(0, len(pieces) - 1)
            await ex.conn.sleep(generation_time)
            if anthropic:
                payload: dict[str, Any] = {
                    "id": ident,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": answer}],
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": usage,
                }
            else:
                payload = {
                    "id": ident,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": "fp_fixture",
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": answer,
                                "refusal": None,
                                "annotations": [],
                            },
                            "logprobs": None,
                            "finish_reason": stop,
                        }
                    ],
                    "usage": usage,
                }
            await ex.send_json(200, payload)
            return

        await ex.start_stream()
        if anthropic:
            await self._stream_anthropic(ex, _Reply(ident, model, pieces, stop), input_tokens, output_tokens)
        else:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            await self._stream_openai(ex, _Reply(ident, model, pieces, stop), usage if include_usage else None)
        await ex.end_stream()

    async def _run_tokens(
        self,
        ex: _Exchange,
        pieces: Sequence[str],
        emit: Callable[[str], Awaitable[None]],
        emit_error: Callable[[], Awaitable[None]],
    ) -> bool:
        """Send the text events with scripted timing; False if an in-stream error ended it."""
        behavior = ex.record.behavior
        for i, piece in enumerate(pieces):
            if behavior.error_after is not None and i >= behavior.error_after:
                await emit_error()
                return False
            await ex.token_gate(i)
            ex.token_sent()
            await emit(piece)
        if behavior.error_after is not None and behavior.error_after >= len(pieces):
            await emit_error()
            return False
        if behavior.drop_after is not None and behavior.drop_after >= len(pieces):
            raise _Dropped  # all text sent, but the stream never finishes
        return True

    async def _stream_anthropic(self, ex: _Exchange, reply: _Reply, input_tokens: int, output_tokens: int) -> None:
        ident, model, pieces, stop = reply

        async def event(name: str, data: Mapping[str, Any]) -> None:
            await ex.send_chunk(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

        message: dict[str, Any] = {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }
        await event("message_start", {"type": "message_start", "message": message})
        await event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        await event("ping", {"type": "ping"})

        async def emit(piece: str) -> None:
            delta = {"type": "text_delta", "text": piece}
            await event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})

        async def emit_error() -> None:
            behavior = ex.record.behavior
            error = {
                "type": behavior.error_type or "overloaded_error",
                "message": behavior.error_message or "Overloaded",
            }
            await event("error", {"type": "error", "error": error})

        if not await self._run_tokens(ex, pieces, emit, emit_error):
            return
        await event("content_block_stop", {"type": "content_block_stop", "index": 0})
        await event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        )
        await event("message_stop", {"type": "message_stop"})

    async def _stream_openai(self, ex: _Exchange, reply: _Reply, usage: Mapping[str, Any] | None) -> None:
        ident, model, pieces, stop = reply
        created = int(time.time())

        async def chunk(choices: list[dict[str, Any]], chunk_usage: Mapping[str, Any] | None = None) -> None:
            data: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fixture",
                "choices": choices,
            }
            if usage is not None:
                data["usage"] = chunk_usage  # null on every chunk but the last, like the real API
            await ex.send_chunk(f"data: {json.dumps(data)}\n\n".encode())

        def choice(delta: Mapping[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish}]

        await chunk(choice({"role": "assistant", "content": "", "refusal": None}))

        async def emit(piece: str) -> None:
            await chunk(choice({"content": piece}))

        async def emit_error() -> None:
            behavior = ex.record.behavior
            error = {
                "message": behavior.error_message or "The server had an error while processing your request.",
                "type": behavior.error_type or "server_error",
                "param": None,
                "code": None,
            }
            await ex.send_chunk(f"data: {json.dumps({'error': error})}\n\n".encode())

        if not await self._run_tokens(ex, pieces, emit, emit_error):
            return
        await chunk(choice({}, stop))
        if usage is not None:
            await chunk([], usage)
        await ex.send_chunk(b"data: [DONE]\n\n")
